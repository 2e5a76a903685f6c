"""Chains are unchanged by the DAG engine: bounds of digits chain networks, bit for bit.

Run once with each checkout on ``PYTHONPATH`` and compare (not a pytest module)::

    PYTHONPATH=/work/main python tests/bounds/compare_chain_bounds.py save /tmp/main.pt
    PYTHONPATH=$PWD python tests/bounds/compare_chain_bounds.py check /tmp/main.pt

The networks are built from seeded weights (an MLP, a CNN with BatchNorm, a MaxPool CNN), the
boxes from seeded digits; every bound of ibp, crown, crown-ibp, alpha-crown (and the model's
own rounding, ``model_rounding=True``), float32 and float64, must be identical.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from certify.bounds import compute_bounds
from certify.nets import create_arch
from certify.nets.layers import Normalize


def _nets() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    mlp = create_arch("mlp-32-16", (1, 8, 8), 10, mean=[0.3], std=[0.4])
    cnn = create_arch("scn-4-8", (1, 8, 8), 10, mean=[0.3], std=[0.4])
    bn = nn.Sequential(Normalize([0.3], [0.4]), nn.Conv2d(1, 4, 3, padding=1),
                       nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                       nn.Flatten(), nn.Linear(36, 10))
    pool = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 10))
    for m in bn.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return {"mlp": mlp.eval(), "cnn": cnn.eval(), "bn": bn.eval(), "pool": pool.eval()}


def bounds() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 8, 8, generator=g)
    for name, model in _nets().items():
        for dtype in (torch.float32, torch.float64):
            m = model.to(dtype)
            xd = x.to(dtype)
            for method in ("ibp", "crown", "crown-ibp", "alpha-crown"):
                for rounding in (False, True):
                    with torch.no_grad():
                        b = compute_bounds(m, xd - 0.03, xd + 0.03, method,
                                           model_rounding=rounding)
                    key = f"{name}/{dtype}/{method}/{rounding}"
                    out[key + "/lo"], out[key + "/hi"] = b.lower, b.upper
    return out


def main() -> int:
    mode, path = sys.argv[1], sys.argv[2]
    got = bounds()
    if mode == "save":
        torch.save(got, path)
        print(f"saved {len(got)} bound tensors")
        return 0
    ref = torch.load(path)
    bad = [k for k in ref if not torch.equal(ref[k], got[k])]
    print(f"{len(ref) - len(bad)}/{len(ref)} bound tensors bit-identical")
    for k in bad:
        print("DIFFERS:", k, float((ref[k] - got[k]).abs().max()))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
