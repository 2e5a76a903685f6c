"""auto_LiRPA's methods in the one method registry, and the one-line install message where it
is absent. Runs without auto_LiRPA (its absence is simulated)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from certify.bounds import compute_bounds, get_method, list_methods, margin_bounds
from certify.bounds.auto_lirpa import (
    INSTALL_MESSAGE,
    auto_lirpa_bounds,
    auto_lirpa_margin_bounds,
    engine_info,
    is_auto_lirpa_available,
    require_auto_lirpa,
)
from certify.bounds.base import method_class
from certify.errors import CertifyError, SpecError, UnknownNameError
from certify.radius import certified_radii
from certify.spec import LinfBall


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
        lambda: get_method("lirpa-crown"),
        lambda: engine_info(),
        lambda: auto_lirpa_bounds(tiny_mlp, x, x, "crown"),
        lambda: auto_lirpa_margin_bounds(tiny_mlp, x, y, 0.1, "ibp"),
        lambda: margin_bounds(tiny_mlp, x, y, 0.1, "lirpa-ibp"),
        lambda: compute_bounds(tiny_mlp, x, x, "lirpa-crown"),
        lambda: certified_radii(tiny_mlp, x, y, "lirpa-alpha-crown"),
    ]
    for call in calls:
        with pytest.raises(CertifyError) as err:
            call()
        _assert_install_message(err)


def test_names_are_checked_before_the_import(no_auto_lirpa: None) -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'lirpa-alpha-crown'"):
        get_method("lirpa-alpha_crown")
    with pytest.raises(SpecError, match="unknown option 'steps'"):
        get_method("lirpa-alpha-crown", steps=3)
    assert list_methods(external=True) == ["lirpa-ibp", "lirpa-crown", "lirpa-crown-ibp",
                                           "lirpa-alpha-crown"]


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


def test_one_registry_native_first() -> None:
    native = list_methods(external=False)
    assert list_methods() == native + list_methods(external=True)
    for name in list_methods(external=True):
        cls = method_class(name)
        assert cls.takes_module and not cls.serves_intermediate
        assert name == f"lirpa-{cls.native}" and cls.native in native  # confirmed by it
    with pytest.raises(UnknownNameError, match="did you mean 'lirpa-crown'"):
        get_method("lirpa_crown")


def test_a_configured_method_is_callable_on_a_region(tiny_cnn) -> None:
    x = torch.rand(3, 1, 8, 8)
    y = torch.tensor([0, 4, 9])
    eps = torch.tensor([0.0, 0.01, 0.03])
    method = get_method("alpha-crown", steps=3)
    from certify.spec import margin_spec

    got = method(tiny_cnn, LinfBall(x, eps), margin_spec(y, 10).to(x.dtype))
    want = margin_bounds(tiny_cnn, x, y, eps, get_method("alpha-crown", steps=3))
    assert torch.equal(got.lower, want.lower) and torch.equal(got.upper, want.upper)


def test_native_names_and_options_fail_at_once() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'crown'"):
        get_method("crwn")
    with pytest.raises(SpecError, match="unknown option 'alpha_steps'"):
        get_method("alpha-crown", alpha_steps=3)
