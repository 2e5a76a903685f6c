"""A small digits MLP trained with plain torch, for tests that need a trained model."""

from __future__ import annotations

import torch
from torch import nn


def train_digits_mlp(epochs: int, *, seed: int = 0) -> nn.Sequential:
    """``mlp-32-16`` on digits: Adam (lr 1e-2), cross-entropy, batches of 64, `epochs` passes;
    the same `seed` gives the same weights. Returned in eval mode."""
    from certify.data import load_dataset
    from certify.nets import create_arch

    train = load_dataset("digits", "train")
    torch.manual_seed(seed)
    model = create_arch("mlp-32-16", (1, 8, 8), 10, mean=[0.3052], std=[0.376])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for xb, yb in train.batches(64, shuffle=True, generator=g):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()
