"""Input regions and output specifications.

* :class:`LinfBall` is the perturbation set ``{x' : ||x' - x||_inf <= eps} ∩ [0, 1]^d`` of a batch
  of images, one ``eps`` per sample. Proofs use its :meth:`~LinfBall.box`, rounded **outward**
  (never smaller than the exact ball); attacks use :meth:`~LinfBall.inner_box` and
  :meth:`~LinfBall.project`, rounded **inward** (every point within ``eps`` of the centre in
  exact arithmetic), and accept a point only after :meth:`~LinfBall.contains` checks it exactly.
* :class:`Box` is an axis-aligned box of inputs (a VNNLIB property's input box), with the same
  interface for attacks.
* :func:`margin_spec` builds the specification matrix ``C`` whose rows are the margins
  ``f_y - f_j`` (``j != y``): a sample is verified when every row has a positive lower bound.

Shapes follow :mod:`certify.types`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from certify.errors import SpecError

__all__ = ["Box", "LinfBall", "margin_spec", "round_to"]


@dataclass(frozen=True)
class LinfBall:
    """An L-infinity ball around each image of a batch, clipped to the image domain.

    Args:
        center: Images `(N, C, H, W)` inside `domain`.
        eps: Radius, a float or a tensor `(N,)`, all >= 0; stored as `(N,)` with the dtype and
            device of `center` (rounded up when that dtype is narrower).
        domain: The box every image lives in, `(0.0, 1.0)` for pixel space.

    Attributes:
        eps_inner: `(N,)` the requested eps rounded *down* to the dtype of `center`: the radius
            attacks work in, so that a point they report lies in the requested ball exactly.

    Raises:
        SpecError: if `center` is not a floating `(N, C, H, W)` tensor inside `domain`, if `eps`
            is negative, NaN or of the wrong shape, or if the domain is empty.
    """

    center: Tensor
    eps: Tensor
    domain: tuple[float, float] = (0.0, 1.0)
    eps_inner: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        center = self.center
        if not isinstance(center, Tensor) or center.ndim != 4 or not center.is_floating_point():
            got = tuple(center.shape) if isinstance(center, Tensor) else type(center).__name__
            raise SpecError(f"LinfBall center must be a float tensor (N, C, H, W), got {got}.")
        lo, hi = (float(v) for v in self.domain)
        if not lo < hi:
            raise SpecError(f"LinfBall domain must satisfy low < high, got {self.domain}.")
        if center.numel() and (torch.isnan(center).any() or center.min() < lo
                               or center.max() > hi):
            raise SpecError(
                f"LinfBall center must lie in the domain [{lo}, {hi}], got values in "
                f"[{float(center.min())}, {float(center.max())}]; models take [0, 1] pixels.")
        n = center.shape[0]
        eps = self.eps if isinstance(self.eps, Tensor) else torch.as_tensor(self.eps,
                                                                              dtype=torch.float64)
        eps = eps.to(center.device)
        if eps.ndim == 0:
            eps = eps.expand(n)
        if eps.shape != (n,):
            raise SpecError(f"eps must be a float or a tensor of shape ({n},), "
                            f"got shape {tuple(eps.shape)}.")
        if not eps.is_floating_point():
            eps = eps.to(torch.float64)
        if torch.isnan(eps).any() or (eps < 0).any():
            raise SpecError(f"eps must be >= 0, got min {float(eps.min())}.")
        object.__setattr__(self, "eps", round_to(eps, center.dtype, up=True))
        object.__setattr__(self, "eps_inner", round_to(eps, center.dtype, up=False))
        object.__setattr__(self, "domain", (lo, hi))

    def __repr__(self) -> str:
        n = self.center.shape[0]
        eps = (f"{float(self.eps[0]):.6g}" if n and bool((self.eps == self.eps[0]).all())
               else f"[{float(self.eps.min()):.6g}, {float(self.eps.max()):.6g}]" if n else "[]")
        return (f"LinfBall(center={tuple(self.center.shape)} {str(self.center.dtype)[6:]}, "
                f"eps={eps}, domain={self.domain})")

    def box(self) -> tuple[Tensor, Tensor]:
        """The region as a box: `clip(center - eps, domain)`, `clip(center + eps, domain)`.

        Rounded outward: `eps` was converted to the center's dtype rounding up, and each end is
        moved one unit in the last place outward (more than the rounding error of the sum), so
        the box contains the exact real-valued ball (clipped) -- float rounding never shrinks
        the region a bound is proven for.

        Returns:
            `(x_lo, x_hi)`, each `(N, C, H, W)`.
        """
        eps = self.eps.view(-1, 1, 1, 1)
        lo, hi = self.domain
        down = torch.full_like(self.center, float("-inf"))
        x_lo = torch.nextafter(self.center - eps, down).clamp(lo, hi)
        x_hi = torch.nextafter(self.center + eps, -down).clamp(lo, hi)
        return x_lo, x_hi

    def inner_box(self) -> tuple[Tensor, Tensor]:
        """The largest float box inside both the exact ball and the domain, for attacks.

        ``center ± eps_inner`` rounded to the nearest float can land a hair outside the real
        ball; such ends are moved one float inward (decided by an exact comparison), and the
        domain's ends are rounded inward too. Every point of this box passes :meth:`contains`.

        Returns:
            `(lower, upper)`, each `(N, C, H, W)` in the dtype of `center`.
        """
        x = self.center
        e = self.eps_inner.view(-1, *([1] * (x.ndim - 1)))
        lower = x - e
        upper = x + e
        lower = torch.where(_exceeds(x, lower, e), torch.nextafter(lower, x), lower)
        upper = torch.where(_exceeds(upper, x, e), torch.nextafter(upper, x), upper)
        lo, hi = _inner_domain(self.domain, x.dtype)
        return lower.clamp(min=lo), upper.clamp(max=hi)

    def project(self, x: Tensor) -> Tensor:
        """Points `x` `(N, C, H, W)` clipped into :meth:`inner_box` (nearest point there)."""
        lower, upper = self.inner_box()
        return torch.minimum(torch.maximum(x, lower), upper)

    def contains(self, x: Tensor) -> Tensor:
        """`(N,)` bool: each point of `x` `(N, C, H, W)` is finite, in the domain and within
        `eps_inner` (hence within the requested eps) of its centre, in exact arithmetic."""
        if x.shape != self.center.shape:
            raise SpecError(f"points must have the centre's shape {tuple(self.center.shape)}, "
                            f"got {tuple(x.shape)}.")
        flat = x.flatten(1)
        lo, hi = self.domain
        e = self.eps_inner.view(-1, *([1] * (x.ndim - 1)))
        inside = ~_exceeds(x, self.center, e).flatten(1).any(dim=1)
        in_domain = (flat.double() >= lo).all(dim=1) & (flat.double() <= hi).all(dim=1)
        return inside & in_domain & torch.isfinite(flat).all(dim=1)

    def sample(self, n: int, *, generator: torch.Generator | None = None,
               corners: bool = False) -> Tensor:
        """Points of the region: uniform in the box, or random vertices of the box.

        Args:
            n: How many points per sample.
            generator: Random generator (on the device of `center`) for reproducible points.
            corners: If True, every coordinate is independently the box's lower or upper end.

        Returns:
            Points `(n, N, C, H, W)`, inside the box.
        """
        if n < 0:
            raise SpecError(f"number of samples must be >= 0, got {n}.")
        x_lo, x_hi = self.box()
        shape = (n, *x_lo.shape)
        u = torch.rand(shape, generator=generator, dtype=x_lo.dtype, device=x_lo.device)
        if corners:
            return torch.where(u < 0.5, x_lo, x_hi)
        # lo + u * (hi - lo) can round above hi; clamping keeps every point inside the box.
        return torch.minimum(torch.maximum(x_lo + u * (x_hi - x_lo), x_lo), x_hi)


def round_to(values: Tensor, dtype: torch.dtype, *, up: bool) -> Tensor:
    """`values` in `dtype`, rounded up (never below the exact value) or down (never above).

    Args:
        values: Any floating tensor; values `dtype` cannot hold are rounded in the given
            direction, the others converted exactly.
        dtype: The floating dtype of the result.
        up: Round towards +inf (True) or -inf (False).
    """
    cast = values.to(dtype)
    if values.dtype != dtype:
        back = cast.to(values.dtype)
        wrong = back < values if up else back > values
        toward = torch.full_like(cast, float("inf") if up else float("-inf"))
        cast = torch.where(wrong, torch.nextafter(cast, toward), cast)
    return cast


def _exceeds(a: Tensor, b: Tensor, eps: Tensor) -> Tensor:
    """Elementwise ``|a - b| > eps`` in exact arithmetic (broadcasting).

    The difference is computed in float64 with its exact rounding error (Knuth's TwoSum), so
    the comparison has no rounding error for float32 or float64 inputs.
    """
    x, y, e = a.double(), -b.double(), eps.double()
    s = x + y
    bv = s - x
    err = (x - (s - bv)) + (y - bv)  # x + y == s + err exactly
    d = s.abs()
    t = torch.where(s < 0, -err, err)  # |x + y| == d + t exactly
    return torch.where(d > e, (d - e) > -t, (d == e) & (t > 0))


def _inner_domain(domain: tuple[float, float], dtype: torch.dtype) -> tuple[float, float]:
    """The domain's ends rounded inward to `dtype`."""
    lo, hi = torch.tensor(domain, dtype=torch.float64)
    return (float(round_to(lo, dtype, up=True)), float(round_to(hi, dtype, up=False)))


@dataclass(frozen=True)
class Box:
    """An axis-aligned box of inputs, ``lower <= x <= upper`` per sample (e.g. a VNNLIB input box).

    The ends are exact floats of the inputs' dtype (round a decimal box inward before building
    one for an attack, outward for a proof); :meth:`box` and :meth:`inner_box` are the same.

    Args:
        lower: `(N, ...)` lower ends.
        upper: `(N, ...)` upper ends, same shape and dtype, `lower <= upper`.

    Raises:
        SpecError: mismatched shapes or dtypes, NaN, or ``lower > upper``.
    """

    lower: Tensor
    upper: Tensor

    def __post_init__(self) -> None:
        lower, upper = self.lower, self.upper
        if (not isinstance(lower, Tensor) or not isinstance(upper, Tensor) or lower.ndim < 1
                or lower.shape != upper.shape or lower.dtype != upper.dtype
                or not lower.is_floating_point()):
            raise SpecError("Box needs float tensors lower and upper of one shape (N, ...) and "
                            "dtype.")
        if bool(torch.isnan(lower).any() | torch.isnan(upper).any()) or bool(
                (lower > upper).any()):
            raise SpecError("Box needs lower <= upper everywhere (and no NaN).")

    @property
    def center(self) -> Tensor:
        """The midpoint `(N, ...)`, inside the box."""
        mid = self.lower + 0.5 * (self.upper - self.lower)
        return torch.minimum(torch.maximum(mid, self.lower), self.upper)

    @property
    def radius(self) -> Tensor:
        """Half the width per coordinate, `(N, ...)`: the scale of attack steps."""
        return (self.upper - self.lower) / 2

    def box(self) -> tuple[Tensor, Tensor]:
        """`(lower, upper)`."""
        return self.lower, self.upper

    def inner_box(self) -> tuple[Tensor, Tensor]:
        """`(lower, upper)`: the ends are exact, so the box is its own inner box."""
        return self.lower, self.upper

    def project(self, x: Tensor) -> Tensor:
        """Points `x` `(N, ...)` clipped into the box."""
        return torch.minimum(torch.maximum(x, self.lower), self.upper)

    def contains(self, x: Tensor) -> Tensor:
        """`(N,)` bool: each point of `x` is finite and inside the box (exactly)."""
        flat = x.flatten(1)
        inside = (x >= self.lower) & (x <= self.upper)
        return inside.flatten(1).all(dim=1) & torch.isfinite(flat).all(dim=1)


def margin_spec(labels: Tensor, num_classes: int) -> Tensor:
    """Specification rows `e_y - e_j` for every `j != y`, in increasing `j`.

    Args:
        labels: Labels `(N,)`, integers in `[0, num_classes)`.
        num_classes: K, at least 2.

    Returns:
        `C` of shape `(N, K - 1, K)` (float32 on the labels' device): `(C @ f)[n, i]` is the
        margin `f_y - f_j` for the `i`-th `j != y`.

    Raises:
        SpecError: if `labels` is not a 1-D integer tensor in range or `num_classes < 2`.
    """
    k = int(num_classes)
    if k < 2:
        raise SpecError(f"num_classes must be >= 2 for margins, got {num_classes}.")
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point():
        got = (f"{tuple(labels.shape)} {labels.dtype}" if isinstance(labels, Tensor)
               else type(labels).__name__)
        raise SpecError(f"labels must be an integer tensor of shape (N,), got {got}.")
    if labels.numel() and (labels.min() < 0 or labels.max() >= k):
        raise SpecError(f"labels must lie in [0, {k}), got values in "
                        f"[{int(labels.min())}, {int(labels.max())}].")
    labels = labels.long()
    n = labels.shape[0]
    # Row i of sample n targets class j_i = i + (i >= y): the classes other than y, in order.
    rows = torch.arange(k - 1, device=labels.device).expand(n, k - 1)
    others = rows + (rows >= labels[:, None]).long()
    spec = torch.zeros(n, k - 1, k, device=labels.device)
    spec.scatter_(2, labels.view(n, 1, 1).expand(n, k - 1, 1), 1.0)
    spec.scatter_(2, others.unsqueeze(2), -1.0)
    return spec
