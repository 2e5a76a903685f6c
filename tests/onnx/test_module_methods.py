"""Methods that bound the module itself without rounding control (auto_LiRPA's ``lirpa-*``)
only propose: the radius search and ``verify`` count a proof only once the native rigorous bound
of the same method confirms it. Checked with a registered method that claims everything."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from onnx_helpers import crown_proves_ibp_does_not, robustness_vnnlib
from torch import Tensor, nn

from certify.bounds import Bounds, get_method, margin_bounds
from certify.bounds import base as registry
from certify.bounds.base import MethodBase
from certify.radius import certified_radii
from certify.spec import margin_spec
from certify.verify import verify
from certify.vnnlib import parse_vnnlib


@dataclass(frozen=True)
class Liar(MethodBase):
    """Claims every specification row is above 1e6: a proof of anything, never true."""

    name: ClassVar[str] = "liar"
    confirmed_by: ClassVar[str | None] = None
    takes_module: ClassVar[bool] = True
    external: ClassVar[bool] = True
    serves_intermediate: ClassVar[bool] = False

    def bound_module(self, model: nn.Module, x_lo: Tensor, x_hi: Tensor,
                     spec: Tensor | None = None, *, intermediate: Any = None) -> Bounds:
        assert spec is not None
        big = torch.full(spec.shape[:2], 1e6, dtype=x_lo.dtype)
        return Bounds(big, big)

    def bound(self, *args: Any, **kwargs: Any) -> Bounds:
        raise AssertionError("a module method gets the module")

    def intermediate(self, *args: Any, **kwargs: Any) -> tuple[Bounds, ...]:
        raise AssertionError("not used")

    def search_pair(self) -> tuple[Any, Any]:
        return self, (None if self.confirmed_by is None else get_method(self.confirmed_by))


@dataclass(frozen=True)
class LiarIbp(Liar):
    name: ClassVar[str] = "liar-ibp"
    confirmed_by: ClassVar[str | None] = "ibp"


@dataclass(frozen=True)
class LiarCrown(Liar):
    name: ClassVar[str] = "liar-crown"
    confirmed_by: ClassVar[str | None] = "crown"


@pytest.fixture
def liars(monkeypatch: pytest.MonkeyPatch) -> None:
    for cls in (Liar, LiarIbp, LiarCrown):
        monkeypatch.setitem(registry._METHODS, cls.name, cls)


def _mlp(seed: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()


def test_radius_of_a_lying_method_is_one_the_native_bound_proves(liars: None) -> None:
    model = _mlp()
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    crown = certified_radii(model, x, y, "crown", tol=1e-4, eps_max=0.5)
    lied = certified_radii(model, x, y, "liar-crown", tol=1e-4, eps_max=0.5)
    assert (lied.certified_eps <= crown.certified_eps + 1e-4).all()
    ok = lied.certified_eps > 0
    assert ok.any()
    proof = margin_bounds(copy.deepcopy(model).double(), x[ok].double(), y[ok],
                          lied.certified_eps[ok], "crown")
    assert (proof.lower.amin(1) > 0).all()
    unconfirmed = certified_radii(model, x, y, "liar", tol=1e-4, eps_max=0.5)
    assert (unconfirmed.certified_eps == 0.5).all()  # what the confirmation prevents


def test_verify_decides_by_the_confirming_native_bound(liars: None) -> None:
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(1, 16, generator=g)
    label = int(model(x).argmax())
    spec = margin_spec(torch.tensor([label]), 4).double()
    eps = crown_proves_ibp_does_not(model, x, spec, np.geomspace(1e-3, 0.3, 40))
    prop = parse_vnnlib(robustness_vnnlib(x, label, 4, eps))
    unconfirmed = verify(model, prop, timeout=5, methods=("liar",), use_milp=False, use_bab=False)
    by_ibp = verify(model, prop, timeout=5, methods=("liar-ibp",), use_milp=False,
                    use_bab=False)
    by_crown = verify(model, prop, timeout=20, methods=("liar-crown",), use_milp=False,
                      use_bab=False)
    assert unconfirmed.result == "unknown" and by_ibp.result == "unknown"
    assert by_crown.result == "unsat"
