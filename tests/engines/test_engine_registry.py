"""Engine selection, and the one-line install message where auto_LiRPA is absent. Runs without
auto_LiRPA (its absence is simulated)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import certify
from certify.bounds import get_method, list_methods, margin_bounds
from certify.engines import (
    INSTALL_MESSAGE,
    auto_lirpa_bounds,
    auto_lirpa_margin_bounds,
    engine_info,
    get_engine_info,
    get_margin_bound_fn,
    is_auto_lirpa_available,
    list_engine_methods,
    list_engines,
    require_auto_lirpa,
)
from certify.errors import CertifyError, SpecError, UnknownNameError


@pytest.fixture
def no_auto_lirpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import auto_LiRPA` fail as it does where it is not installed."""
    monkeypatch.setitem(sys.modules, "auto_LiRPA", None)


def _assert_install_message(err: pytest.ExceptionInfo[CertifyError]) -> None:
    message = str(err.value)
    assert message == INSTALL_MESSAGE
    assert "\n" not in message
    assert "pip install git+https://github.com/Verified-Intelligence/auto_LiRPA" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no ImportError chain


def test_install_message_is_one_line(no_auto_lirpa: None) -> None:
    assert INSTALL_MESSAGE.startswith("auto_LiRPA is not installed; install it from its "
                                      "repository: pip install git+")
    assert INSTALL_MESSAGE.endswith("(it is optional; the native engine is the default)")
    with pytest.raises(CertifyError) as err:
        require_auto_lirpa()
    _assert_install_message(err)
    assert not is_auto_lirpa_available()


def test_every_entry_point_says_how_to_install(no_auto_lirpa: None, tiny_mlp) -> None:
    x = torch.rand(2, 1, 4, 4)
    y = torch.tensor([0, 1])
    calls = [
        lambda: get_margin_bound_fn("auto-lirpa", "crown"),
        lambda: engine_info(),
        lambda: get_engine_info("auto-lirpa"),
        lambda: auto_lirpa_bounds(tiny_mlp, x, x, "crown"),
        lambda: auto_lirpa_margin_bounds(tiny_mlp, x, y, 0.1, "ibp"),
    ]
    for call in calls:
        with pytest.raises(CertifyError) as err:
            call()
        _assert_install_message(err)


def test_names_are_checked_before_the_import(no_auto_lirpa: None) -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'alpha-crown'"):
        get_margin_bound_fn("auto-lirpa", "alpha_crown")
    with pytest.raises(SpecError, match="unknown option 'steps'"):
        get_margin_bound_fn("auto-lirpa", "alpha-crown", steps=3)
    assert list_engine_methods("auto-lirpa") == ["ibp", "crown", "crown-ibp", "alpha-crown"]


def test_broken_install_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def fake(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "auto_LiRPA":
            raise AttributeError("module 'torch' has no attribute '_six'\nmore detail")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(CertifyError, match=r"fails to import \(AttributeError: module 'torch' "
                                           r"has no attribute '_six'\); install the current") as e:
        require_auto_lirpa()
    assert "\n" not in str(e.value)


def test_engines_are_listed_default_first() -> None:
    assert list_engines() == ["native", "auto-lirpa"]
    assert list_engine_methods("native") == list_methods()
    with pytest.raises(UnknownNameError, match="did you mean 'auto-lirpa'"):
        get_margin_bound_fn("autolirpa", "crown")
    with pytest.raises(UnknownNameError, match="engine"):
        list_engine_methods("cuda")


def test_native_margin_bound_is_the_engine_s(tiny_cnn) -> None:
    x = torch.rand(3, 1, 8, 8)
    y = torch.tensor([0, 4, 9])
    eps = torch.tensor([0.0, 0.01, 0.03])
    bound = get_margin_bound_fn("native", "alpha-crown", steps=3)
    got = bound(tiny_cnn, x, y, eps)
    want = margin_bounds(tiny_cnn, x, y, eps, get_method("alpha-crown", steps=3))
    assert torch.equal(got.lower, want.lower) and torch.equal(got.upper, want.upper)
    assert bound.info() == {"engine": "native", "version": certify.__version__,
                            "method": "alpha-crown", "options": {"steps": 3}}


def test_native_names_and_options_fail_at_once() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'crown'"):
        get_margin_bound_fn("native", "crwn")
    with pytest.raises(SpecError, match="unknown option 'alpha_steps'"):
        get_margin_bound_fn("native", "alpha-crown", alpha_steps=3)
