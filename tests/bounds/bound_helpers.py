"""Helpers for the bound-engine tests: generated networks and boxes, sampled and attacked
points, the shared soundness and ordering checks, and an independent dense reference of the
backward bound.

The checks call the engine only through :func:`certify.bounds.compute_bounds` (the thing under
test); the references import none of its propagation code: they work on dense matrices taken
from the ``nn.Module`` blocks themselves (by their Jacobians), so agreeing with them is
evidence, not a tautology.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from certify.bounds import compute_bounds
from certify.nets import Normalize
from certify.spec import LinfBall

F64 = torch.float64
# slack of the soundness checks, relative to the largest reachable value (the reference
# values are the model's own floating-point outputs)
SOUND_ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# --- generated networks ----------------------------------------------------------------------


def init_weights(model: nn.Module, gen: torch.Generator, gain: float = 1.0,
                 bias_scale: float = 0.3) -> nn.Sequential:
    """Random weights with fan-in scaling (times `gain`: outputs of order one for 1), biases of
    scale `bias_scale`, random eval BatchNorm stats (negative scales too); in eval mode."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=gen) * gain / fan_in**0.5
            if m.bias is not None:
                m.bias.data = torch.randn(m.bias.shape, generator=gen) * bias_scale
        elif isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean = torch.randn(c, generator=gen) * 0.3
            m.running_var = torch.rand(c, generator=gen) + 0.5
            m.weight.data = torch.randn(c, generator=gen)  # negative scales too
            m.bias.data = torch.randn(c, generator=gen) * 0.3
    return model.eval()  # type: ignore[return-value]


def make_mlp(seed: int, widths: list[int], *, in_shape: tuple[int, int, int] = (1, 4, 4),
             classes: int = 3) -> nn.Sequential:
    """Normalize, Flatten, [Linear, ReLU, Dropout/Identity]*, Linear."""
    gen = torch.Generator().manual_seed(seed)
    c = in_shape[0]
    mean = (torch.rand(c, generator=gen) * 0.6 + 0.2).tolist()
    std = (torch.rand(c, generator=gen) * 0.5 + 0.2).tolist()
    layers: OrderedDict[str, nn.Module] = OrderedDict(norm=Normalize(mean, std),
                                                      flatten=nn.Flatten())
    features = c * in_shape[1] * in_shape[2]
    for i, w in enumerate(widths):
        layers[f"fc{i}"] = nn.Linear(features, w)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"drop{i}"] = nn.Dropout(0.5) if i % 2 == 0 else nn.Identity()
        features = w
    layers["out"] = nn.Linear(features, classes)
    return init_weights(nn.Sequential(layers), gen)


def make_cnn(seed: int, variant: int = 0, *, classes: int = 4) -> tuple[nn.Sequential,
                                                                          tuple[int, int, int]]:
    """A small CNN with every supported layer; `variant` changes strides, paddings, pooling."""
    gen = torch.Generator().manual_seed(seed)
    v = variant % 3
    in_shape = (2, 7, 7) if v != 1 else (1, 8, 8)
    c = in_shape[0]
    mean = (torch.rand(c, generator=gen) * 0.6 + 0.2).tolist()
    std = (torch.rand(c, generator=gen) * 0.5 + 0.2).tolist()
    if v == 0:
        body = [("conv1", nn.Conv2d(c, 3, 3, stride=2, padding=2)), ("bn1", nn.BatchNorm2d(3)),
                ("relu1", nn.ReLU()),
                ("block", nn.Sequential(OrderedDict(
                    conv2=nn.Conv2d(3, 4, 3, padding=1), relu2=nn.ReLU(),
                    pool=nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)))),
                ("conv3", nn.Conv2d(4, 3, 2, stride=1, padding=1)), ("relu3", nn.ReLU())]
    elif v == 1:
        body = [("conv1", nn.Conv2d(c, 3, 4, stride=2, padding=1)), ("relu1", nn.ReLU()),
                ("drop", nn.Dropout(0.3)), ("pool", nn.AvgPool2d(2, stride=1, padding=1)),
                ("bn2", nn.BatchNorm2d(3)), ("conv2", nn.Conv2d(3, 4, 3, stride=2, padding=0)),
                ("id", nn.Identity()), ("relu2", nn.ReLU())]
    else:
        body = [("conv1", nn.Conv2d(c, 4, 3, padding="same")), ("bn1", nn.BatchNorm2d(4)),
                ("relu1", nn.ReLU()), ("conv2", nn.Conv2d(4, 4, 3, stride=3, padding=1)),
                ("relu2", nn.ReLU()), ("pool", nn.AvgPool2d(2, divisor_override=3))]
    layers: OrderedDict[str, nn.Module] = OrderedDict([("norm", Normalize(mean, std)), *body])
    model = nn.Sequential(layers)
    features = model(torch.zeros(1, *in_shape)).numel()
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc1", nn.Linear(features, 6))
    model.add_module("relu_fc1", nn.ReLU())
    model.add_module("out", nn.Linear(6, classes))
    return init_weights(model, gen), in_shape


def make_box(seed: int, n: int, in_shape: tuple[int, ...], eps_max: float,
             dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Centers in [0, 1] (some on the edges, so the box is clipped), per-sample eps (one 0)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *in_shape, generator=gen, dtype=torch.float64)
    edge = torch.rand(n, *in_shape, generator=gen, dtype=torch.float64)
    x = torch.where(edge < 0.15, 0.0, torch.where(edge > 0.85, 1.0, x))
    eps = torch.rand(n, generator=gen, dtype=torch.float64) * eps_max
    eps[0] = 0.0 if n > 2 else eps[0]
    x_lo, x_hi = LinfBall(x, eps).box()
    return x_lo.to(dtype), x_hi.to(dtype), x.to(dtype)


def random_spec(seed: int, n: int, s: int, k: int, dtype: torch.dtype) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, s, k, generator=gen, dtype=torch.float64).to(dtype)


# --- points in the box -----------------------------------------------------------------------


def spec_values(model: nn.Module, xs: Tensor, spec: Tensor) -> Tensor:
    """`spec @ model(x)` for points `(n, N, *in)`: `(n, N, S)`."""
    n, b = xs.shape[:2]
    out = model(xs.reshape(n * b, *xs.shape[2:])).reshape(n, b, -1)
    return torch.einsum("nbk,bsk->nbs", out, spec)


def pgd_points(model: nn.Module, x_lo: Tensor, x_hi: Tensor, spec: Tensor, *, steps: int = 25,
               seed: int = 0) -> Tensor:
    """Points `(2S, N, *in)` found by PGD minimizing (first S) and maximizing (last S) each
    specification row over the box."""
    gen = torch.Generator().manual_seed(seed)
    s = spec.shape[1]
    sign = torch.cat([torch.ones(s), -torch.ones(s)]).to(x_lo.dtype)  # minimize sign * value
    width = x_hi - x_lo
    x = (x_lo + torch.rand((2 * s, *x_lo.shape), generator=gen, dtype=x_lo.dtype) * width)
    step = width / 4
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            values = spec_values(model, x, spec)  # (2S, N, S)
            rows = torch.arange(2 * s) % s
            objective = (values[torch.arange(2 * s), :, rows] * sign[:, None]).sum()
            (grad,) = torch.autograd.grad(objective, x)
        x = torch.minimum(torch.maximum(x - step * grad.sign(), x_lo), x_hi)
        step = step * 0.85
    return x.detach()


def all_points(model: nn.Module, x_lo: Tensor, x_hi: Tensor, spec: Tensor, x: Tensor,
               seed: int = 0, n_uniform: int = 64, n_corners: int = 32) -> Tensor:
    """Uniform samples, box corners, PGD points and the centers: `(n, N, *in)`."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand((n_uniform, *x_lo.shape), generator=gen, dtype=x_lo.dtype)
    uniform = torch.minimum(torch.maximum(x_lo + u * (x_hi - x_lo), x_lo), x_hi)
    c = torch.rand((n_corners, *x_lo.shape), generator=gen, dtype=x_lo.dtype)
    corners = torch.where(c < 0.5, x_lo, x_hi)
    return torch.cat([uniform, corners, pgd_points(model, x_lo, x_hi, spec, seed=seed),
                      x[None]])


# --- shared checks ---------------------------------------------------------------------------


def assert_sound(model: nn.Module, x_lo: Tensor, x_hi: Tensor, x: Tensor, spec: Tensor,
                 method: str, dtype: torch.dtype, **options: object):  # type: ignore[no-untyped-def]
    """`method`'s bounds of ``spec @ model(x)`` over the box (computed on the model cast to
    `dtype`) have that dtype and shape, are ordered, and contain the values at
    :func:`all_points` up to ``SOUND_ATOL[dtype]`` relative. Returns the bounds."""
    model = model.to(dtype)
    bounds = compute_bounds(model, x_lo, x_hi, method, spec, **options)
    assert bounds.lower.dtype == dtype and bounds.lower.shape == spec.shape[:2]
    points = all_points(model, x_lo, x_hi, spec, x)
    with torch.no_grad():
        values = spec_values(model, points, spec)
    atol = SOUND_ATOL[dtype] * (1 + values.abs().max().item())
    low = (values < bounds.lower - atol).nonzero()
    high = (values > bounds.upper + atol).nonzero()
    assert low.numel() == 0, (f"{method}: lower bound above a reachable value at {low[:3]}: "
                              f"{(bounds.lower - values).max().item():.3g}")
    assert high.numel() == 0, (f"{method}: upper bound below a reachable value at {high[:3]}: "
                               f"{(values - bounds.upper).max().item():.3g}")
    assert (bounds.lower <= bounds.upper + atol).all()
    return bounds


def tol(*tensors: Tensor) -> float:
    """Slack of the float64 orderings: ``1e-9`` relative to the largest bound compared."""
    return 1e-9 * (1 + max(t.abs().max().item() for t in tensors))


def assert_alpha_crown_never_looser(model: nn.Module, in_shape: tuple[int, ...], seed: int,
                                    eps: float, *, classes: int, steps: int) -> None:
    """alpha-CROWN (`steps` steps) is never looser than CROWN: it starts from CROWN's slopes
    and keeps each row's best sound bound. Float64, a generated box of 3 samples, 3 rows."""
    model = model.double()
    x_lo, x_hi, _ = make_box(seed, 3, in_shape, eps, F64)
    spec = random_spec(seed, 3, 3, classes, F64)
    crown = compute_bounds(model, x_lo, x_hi, "crown", spec)
    alpha = compute_bounds(model, x_lo, x_hi, "alpha-crown", spec, steps=steps)
    t = tol(crown.lower, crown.upper)
    assert (alpha.lower >= crown.lower - t).all()
    assert (alpha.upper <= crown.upper + t).all()


# --- an independent dense reference ----------------------------------------------------------


def _flat_modules(model: nn.Module) -> list[nn.Module]:
    if type(model) is nn.Sequential:
        return [m for child in model.children() for m in _flat_modules(child)]
    return [model]


def _dense(module: nn.Module, shape: tuple[int, ...]) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """`(W, b, out_shape)` of one affine module (eval mode, float64) from its Jacobian."""
    module = module.double().eval()
    zero = torch.zeros(1, *shape, dtype=torch.float64)
    with torch.no_grad():
        b = module(zero)
    jac = torch.autograd.functional.jacobian(lambda v: module(v), zero)
    return jac.reshape(b.numel(), -1), b.reshape(-1), tuple(b.shape[1:])


def dense_blocks(model: nn.Sequential, in_shape: tuple[int, ...]
                 ) -> list[tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]]:
    """The model as affine maps between its ReLUs, dense float64, from Jacobians of the
    (eval-mode) modules themselves: per block ``(W, b, [(W_m, b_m) per module])``."""
    blocks: list[list[nn.Module]] = [[]]
    for m in _flat_modules(model):
        if isinstance(m, nn.ReLU):
            blocks.append([])
        else:
            blocks[-1].append(m)
    out = []
    shape = tuple(in_shape)
    for modules in blocks:
        n = int(torch.tensor(shape).prod())
        w, b = torch.eye(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        parts = []
        for m in modules:
            wm, bm, shape = _dense(m, shape)
            parts.append((wm, bm))
            w, b = wm @ w, wm @ b + bm
        out.append((w, b, parts))
    return out


def interval_block(parts: list[tuple[Tensor, Tensor]], lo: Tensor, hi: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """Interval bounds through a block, module by module (each exactly)."""
    for w, b in parts:
        center, radius = (hi + lo) / 2, (hi - lo) / 2
        center, radius = w @ center + b, w.abs() @ radius
        lo, hi = center - radius, center + radius
    return lo, hi


def wong_kolter_dual(blocks: list, x_lo: Tensor, x_hi: Tensor,
                     c: Tensor, upto: int, pre: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Wong & Kolter (2018)'s dual objective ``J``, a lower bound of ``c · z_upto``, written as
    in the paper, for one sample with a box instead of the eps-ball:

    ``nu_k = -c``; for each layer ``J -= nu · b``, ``nu_hat = W^T nu``, ``nu = D nu_hat`` with
    ``D = u / (u - l)`` on unstable neurons (1 active, 0 inactive) and
    ``J += sum_unstable l [nu]_+``; finally ``J += min over the box of -nu_hat · x``.

    Args:
        blocks: From :func:`dense_blocks`; ``z_i = W_i h_(i-1) + b_i`` with ``h_(-1) = x``.
        x_lo, x_hi: The box of one sample, flat float64.
        c: `(S, n_upto)` rows on ``z_upto`` (the input of ReLU `upto`, or the output).
        pre: Pre-activation bounds `(l, u)` (flat float64) of ReLUs `0..upto-1`.
    """
    nu = -c
    j = torch.zeros(c.shape[0], dtype=torch.float64)
    for i in range(upto, -1, -1):
        w, b, _ = blocks[i]
        j = j - nu @ b
        nu_hat = nu @ w
        if i == 0:
            break
        lo, hi = pre[i - 1]
        unstable = (lo < 0) & (hi > 0)
        d = torch.where(lo >= 0, 1.0, 0.0).to(torch.float64)
        d = torch.where(unstable, hi / torch.where(unstable, hi - lo, 1.0), d)
        nu = nu_hat * d
        j = j + (nu.clamp(min=0) * torch.where(unstable, lo, 0.0)).sum(1)
    return j + torch.minimum(-nu_hat * x_lo, -nu_hat * x_hi).sum(1)


def crown_primal(blocks: list, x_lo: Tensor, x_hi: Tensor, c: Tensor,
                 upto: int, pre: list[tuple[Tensor, Tensor]]) -> Tensor:
    """CROWN's lower bound of ``c · z_upto`` (adaptive lower slope ``u > -l``), neuron by
    neuron in primal form; arguments as for :func:`wong_kolter_dual`."""
    coef = c.clone()
    const = torch.zeros(c.shape[0], dtype=torch.float64)
    for i in range(upto, -1, -1):
        w, b, _ = blocks[i]
        const = const + coef @ b
        coef = coef @ w
        if i == 0:
            break
        lo, hi = pre[i - 1]
        new = torch.zeros_like(coef)
        for n in range(lo.shape[0]):
            l, u = float(lo[n].detach()), float(hi[n].detach())
            a = coef[:, n]
            if l >= 0:
                new[:, n] = a
            elif u > 0:
                s = u / (u - l)
                alpha = 1.0 if u > -l else 0.0
                new[:, n] = torch.where(a >= 0, a * alpha, a * s)
                const = const + torch.where(a < 0, -a * s * l, torch.zeros_like(a))
        coef = new
    center, radius = (x_hi + x_lo) / 2, (x_hi - x_lo) / 2
    return const + coef @ center - coef.abs() @ radius
