"""Input regions and output specifications.

* :class:`LinfBall` is the perturbation set ``{x' : ||x' - x||_inf <= eps} ∩ [0, 1]^d`` of a batch
  of images, one ``eps`` per sample.
* :func:`margin_spec` builds the specification matrix ``C`` whose rows are the margins
  ``f_y - f_j`` (``j != y``): a sample is verified when every row has a positive lower bound.

Shapes follow :mod:`certify.types`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from certify.errors import SpecError

__all__ = ["LinfBall", "margin_spec"]


@dataclass(frozen=True)
class LinfBall:
    """An L-infinity ball around each image of a batch, clipped to the image domain.

    Args:
        center: Images `(N, C, H, W)` inside `domain`.
        eps: Radius, a float or a tensor `(N,)`, all >= 0; stored as `(N,)` with the dtype and
            device of `center` (rounded up when that dtype is narrower).
        domain: The box every image lives in, `(0.0, 1.0)` for pixel space.

    Raises:
        SpecError: if `center` is not a floating `(N, C, H, W)` tensor inside `domain`, if `eps`
            is negative, NaN or of the wrong shape, or if the domain is empty.
    """

    center: Tensor
    eps: Tensor
    domain: tuple[float, float] = (0.0, 1.0)

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
        object.__setattr__(self, "eps", _round_up(eps, center.dtype))
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


def _round_up(values: Tensor, dtype: torch.dtype) -> Tensor:
    """`values` in `dtype`, rounded up (never below the exact value)."""
    cast = values.to(dtype)
    if values.dtype == torch.float64 and dtype != torch.float64:
        below = cast.to(torch.float64) < values
        cast = torch.where(below, torch.nextafter(cast, torch.full_like(cast, float("inf"))),
                           cast)
    return cast


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
