from __future__ import annotations

import numpy as np
import torch

from certify.data import digits as digits_module
from certify.data import get_dataset_info, load_dataset


def test_split_is_fixed_stratified_and_complete() -> None:
    first = {s: load_dataset("digits", s) for s in ("train", "test")}
    digits_module._split.cache_clear()  # recompute from scratch: the split must not change
    second = {s: load_dataset("digits", s) for s in ("train", "test")}
    for s in ("train", "test"):
        assert torch.equal(first[s].images, second[s].images)
        assert torch.equal(first[s].labels, second[s].labels)
    train, test = first["train"], first["test"]
    assert (len(train), len(test)) == (1347, 450)
    all_labels = torch.cat([train.labels, test.labels])
    overall = torch.bincount(all_labels, minlength=10).double() / len(all_labels)
    for ds in (train, test):
        counts = torch.bincount(ds.labels, minlength=10)
        assert (counts > 0).all(), "a class is missing from a split"
        # stratified: each class's share matches the whole set up to rounding (one image)
        assert ((counts - overall * len(ds)).abs() <= 1.0).all(), counts


def test_digits_images_are_in_unit_range_and_disjoint() -> None:
    from sklearn.datasets import load_digits

    info = get_dataset_info("digits")
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    x, _ = train.tensors()
    assert x.shape[1:] == info.input_shape and x.min() >= 0 and x.max() <= 1
    # together the two splits are exactly the 1797 bundled images, each once
    raw = load_digits().images.reshape(1797, -1) / 16.0
    both = torch.cat([train.tensors()[0], test.tensors()[0]]).reshape(1797, -1).double().numpy()
    key = lambda a: sorted(map(bytes, (a * 16).round().astype(np.uint8)))  # noqa: E731
    assert key(both) == key(raw)


def test_validation_hold_out_is_stratified_disjoint_and_fixed() -> None:
    from certify.data import split_validation, validation_indices

    train = load_dataset("digits", "train")
    fit_idx, val_idx = validation_indices(train.labels)
    again = validation_indices(train.labels)
    assert torch.equal(fit_idx, again[0]) and torch.equal(val_idx, again[1])
    assert set(fit_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(fit_idx.tolist() + val_idx.tolist()) == list(range(len(train)))
    per_class = torch.bincount(train.labels, minlength=10)
    held = torch.bincount(train.labels[val_idx], minlength=10)
    assert ((held - 0.1 * per_class).abs() <= 0.5).all(), held   # 10% of every class
    fit, validation = split_validation(train)
    assert (len(fit), len(validation)) == (len(fit_idx), len(val_idx))
    assert torch.equal(validation.images, train.images[val_idx])
    other = validation_indices(train.labels, seed=1)[1]
    assert not torch.equal(other, val_idx)
