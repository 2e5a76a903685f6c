"""The engine's transposed convolutions on the shapes of svhn-teacher's backward passes (not a
test): ``conv_transpose2d`` against the form the engine picks (a dense matrix, the fold forms
or ``conv_transpose2d`` itself; see ``certify.bounds.layers.FOLD_MAX_CHANNELS``).

Each line is one shape: rows `(P, Co, h, w)` on an output window of the convolution ``Co -> Ci``
(kernel k, stride s), in float32 and float64, the milliseconds of each and their ratio,
alternated in one process (best of `--repeat`). The windows are those a neuron's rows cover on
their way down: 1x1 at the neuron, then its receptive field, cut at the map's border.

Usage:
    python benchmarks/bench_transpose.py              # about 30 s, one thread
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from certify.bounds import layers
from certify.bounds.layers import ConvOp, backward_window_conv

# (rows, Co, Ci, kernel, stride, window h, window w, map size of the conv's input)
SHAPES = [
    (1000, 32, 3, 3, 1, 8, 8, 32),      # into the input: a conv2 neuron's window at conv1
    (1000, 32, 3, 3, 1, 8, 5, 32),      # the same, cut by the border
    (300, 32, 3, 3, 1, 14, 14, 32),     # a conv4 neuron's window at conv1
    (1000, 64, 32, 4, 2, 3, 3, 32),     # a conv3 neuron's window at conv2
    (1000, 64, 32, 4, 2, 2, 3, 32),     # the same, cut by the border
    (1000, 64, 32, 4, 2, 2, 2, 32),
    (300, 64, 32, 4, 2, 6, 6, 32),      # a conv4 neuron's window at conv2
    (300, 128, 64, 3, 1, 4, 4, 16),     # a conv4 neuron's window at conv3
    (300, 128, 64, 3, 1, 2, 2, 16),
    (300, 128, 128, 4, 2, 1, 1, 16),    # a conv4 neuron itself
]


def _op(co: int, ci: int, k: int, s: int, size: int, dtype: torch.dtype) -> ConvOp:
    out = (size + 2 - k) // s + 1
    weight = torch.randn(co, ci, k, k, dtype=dtype)
    return ConvOp(weight, None, (s, s), (1, 1), (ci, size, size), (co, out, out))


def _best(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{'rows':>5} {'Co->Ci':>8} {'k/s':>4} {'window':>7} {'dtype':>8} "
          f"{'conv_transpose2d ms':>20} {'engine ms':>10} {'ratio':>6}  form")
    for rows, co, ci, k, s, h, w, size in SHAPES:
        for dtype in (torch.float32, torch.float64):
            op = _op(co, ci, k, s, size, dtype)
            a = torch.randn(rows, co, h, w, dtype=dtype)
            if layers.dense_transpose(op, h, w, padded=False) is not None:
                form = "dense"
            elif layers._fold_backward(op, a, padded=False) is not None:
                form = "fold"
            else:
                form = "conv_transpose2d"
            base = _best(partial(F.conv_transpose2d, a, op.weight, None, op.stride),
                         args.repeat)
            engine = _best(partial(backward_window_conv, op, a, 1, 1), args.repeat)
            print(f"{rows:>5} {f'{co}->{ci}':>8} {f'{k}/{s}':>4} {f'{h}x{w}':>7} "
                  f"{str(dtype)[6:]:>8} {1e3 * base:>20.2f} {1e3 * engine:>10.2f} "
                  f"{base / engine:>6.2f}  {form}")


if __name__ == "__main__":
    main()
