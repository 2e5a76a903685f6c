"""Generated DAG networks (residual Add, Concat) for the DAG tests."""

from __future__ import annotations

import torch
from bound_helpers import init_weights
from torch import Tensor, nn

from certify.nets.layers import Normalize, ResidualBlock

KINDS = 6
S_KINDS = (3, 4)  # the kinds with a Sigmoid or Tanh


class DagNet(nn.Module):
    """One of several small DAGs, chosen by `kind`:

    0. MLP with a residual block ``relu(h + fc2(relu(fc1(h))))``.
    1. CNN: stem, a ResidualBlock with the identity shortcut (BN folded), flatten, linear.
    2. CNN: stem, a strided ResidualBlock (1x1 conv shortcut), avg pool, linear.
    3. Channel concat of a conv-ReLU branch and a conv-Tanh branch, then conv, linear.
    4. Flat concat of two branches (ReLU, Sigmoid), an Add of a node with itself, linear.
    5. Two nested residuals sharing the input (``x + f(x) + g(x + f(x))``), MLP.
    """

    def __init__(self, kind: int, in_shape: tuple[int, int, int], classes: int) -> None:
        super().__init__()
        self.kind = kind
        c, h, w = in_shape
        self.norm = Normalize([0.4] * c, [0.3] * c)
        flat = c * h * w
        if kind in (0, 5):
            self.inp = nn.Linear(flat, 6)
            self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 6)
            self.fc3, self.fc4 = nn.Linear(6, 4), nn.Linear(4, 6)
            self.out = nn.Linear(6, classes)
        elif kind in (1, 2):
            self.stem = nn.Sequential(nn.Conv2d(c, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())
            self.block = ResidualBlock(3, 3 if kind == 1 else 4, stride=kind)
            self.pool: nn.Module = nn.AvgPool2d(2) if kind == 2 else nn.Identity()
            features = self._features(in_shape)
            self.out = nn.Linear(features, classes)
        elif kind == 3:
            self.a = nn.Conv2d(c, 2, 3, padding=1)
            self.b = nn.Conv2d(c, 3, 3, stride=1, padding=1)
            self.conv = nn.Conv2d(5, 3, 3, stride=2)
            self.out = nn.Linear(self._features(in_shape), classes)
        else:
            self.a = nn.Linear(flat, 4)
            self.b = nn.Linear(flat, 3)
            self.mix = nn.Linear(7, 7)
            self.out = nn.Linear(7, classes)

    def _features(self, in_shape: tuple[int, int, int]) -> int:
        with torch.no_grad():
            return int(self._body(torch.zeros(1, *in_shape)).numel())

    def _body(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        if self.kind in (1, 2):
            return torch.flatten(self.pool(self.block(self.stem(x))), 1)
        if self.kind == 3:
            y = torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)
            return torch.relu(self.conv(y)).flatten(1)
        raise AssertionError

    def forward(self, x: Tensor) -> Tensor:
        if self.kind in (0, 5):
            h = torch.relu(self.inp(torch.flatten(self.norm(x), 1)))
            r = h + self.fc2(torch.relu(self.fc1(h)))
            if self.kind == 5:
                r = r + self.fc4(torch.relu(self.fc3(torch.relu(r))))
            return self.out(torch.relu(r))
        if self.kind == 4:
            f = torch.flatten(self.norm(x), 1)
            y = torch.cat([torch.relu(self.a(f)), torch.sigmoid(self.b(f))], 1)
            z = self.mix(y)
            return self.out(torch.relu(z + z))
        return self.out(self._body(x))


def make_dag(seed: int, kind: int, *, classes: int = 3) -> tuple[DagNet, tuple[int, int, int]]:
    """A generated :class:`DagNet` with seeded weights (eval mode) and its input shape."""
    gen = torch.Generator().manual_seed(seed)
    in_shape = (1, 4, 4) if kind in (0, 4, 5) else (2, 5, 5) if kind != 2 else (1, 6, 6)
    model = DagNet(kind, in_shape, classes)
    init_weights(model, gen)
    return model.eval(), in_shape
