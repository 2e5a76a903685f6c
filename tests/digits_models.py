"""Small digits models trained with plain torch, for tests that need a trained model."""

from __future__ import annotations

import torch
from torch import nn


def train_digits(model: nn.Module, epochs: int, *, seed: int = 0) -> nn.Module:
    """Trains `model` on digits in place: Adam (lr 1e-2), cross-entropy, batches of 64 shuffled
    by a generator seeded with `seed`, `epochs` passes. Returned in eval mode. The global RNG is
    not touched: seed it before building the model for reproducible weights."""
    from certify.data import load_dataset

    train = load_dataset("digits", "train")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for xb, yb in train.batches(64, shuffle=True, generator=g):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def train_digits_mlp(epochs: int, *, seed: int = 0) -> nn.Sequential:
    """``mlp-32-16`` on digits (:func:`train_digits`); the same `seed` gives the same weights.
    Returned in eval mode."""
    from certify.nets import create_arch

    torch.manual_seed(seed)
    model = create_arch("mlp-32-16", (1, 8, 8), 10, mean=[0.3052], std=[0.376])
    train_digits(model, epochs, seed=seed)
    return model
