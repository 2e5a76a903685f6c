"""L1-norm filter pruning (Li, Kadav, Durdanovic, Samet & Graf 2017, "Pruning filters for
efficient ConvNets") that physically shrinks the flat ``nn.Sequential`` models of the zoo.

For every conv layer to prune, its filters are ranked by the L1 norm of their weights
``sum |W[f, :, :, :]|`` and the weakest are *removed*: the output channel with its bias, the
channel's entries in the following ``BatchNorm2d`` (weight, bias, running mean and variance),
and the matching input channels of the next ``Conv2d`` -- or, when a ``Flatten`` and a
``Linear`` come next, the matching input features (channel ``c`` of a ``C x H x W`` map is
features ``c*H*W ... (c+1)*H*W - 1`` of the flattened vector). The result is the same
architecture with smaller widths, so it is saved and rebuilt like any other checkpoint.

Rankings use the unpruned weights of every layer (Li et al.'s *independent* strategy), so the
filters chosen in one layer do not depend on the order in which layers are pruned.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from certify.checkpoint import ModelMeta
from certify.errors import NAME, SpecError, unknown_name
from certify.train.loops import TrainConfig, TrainResult

# Layers that act on each channel separately: a removed channel just passes through them.
_CHANNELWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Identity,
                nn.Dropout, nn.Dropout2d, nn.AvgPool2d, nn.MaxPool2d)

DEFAULT_SCAN_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def conv_layer_names(model: nn.Module) -> list[str]:
    """Names of the model's ``Conv2d`` children, in order (``["conv1", "conv2"]``)."""
    return [name for name, m in model.named_children() if isinstance(m, nn.Conv2d)]


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_children() if isinstance(m, nn.Conv2d)}


def conv_parameters(model: nn.Module) -> int:
    """Number of parameters in the conv layers (weights and biases)."""
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Conv2d)
               for p in m.parameters())


def filter_l1_norms(conv: nn.Conv2d) -> Tensor:
    """``(out_channels,)``: the L1 norm of each filter's weights, ``sum |W[f]|``."""
    return conv.weight.detach().abs().flatten(1).sum(1)


def l1_filter_ranking(conv: nn.Conv2d) -> Tensor:
    """Filter indices ``(out_channels,)`` from the weakest (smallest L1 norm) to the strongest.

    Ties keep the lower index first (a stable sort), so the ranking is deterministic.
    """
    return torch.sort(filter_l1_norms(conv), stable=True).indices


def filters_to_remove(filters: int, ratio: float, layer: str = "layer") -> int:
    """How many of `filters` a `ratio` removes: ``round(ratio * filters)``.

    Raises:
        SpecError: a ratio outside [0, 1), or one that would remove every filter.
    """
    if not (0.0 <= ratio < 1.0):
        raise SpecError(f"pruning ratio for {layer} must be in [0, 1), got {ratio}; it is the "
                        "fraction of filters to remove.")
    remove = math.floor(ratio * filters + 0.5)
    if remove >= filters:
        raise SpecError(f"ratio {ratio} would remove all {filters} filters of {layer} (at least "
                        f"one must stay); use a ratio below {(filters - 0.5) / filters:.3f}.")
    return remove


def resolve_ratios(model: nn.Module, ratio: float | Mapping[str, float]) -> dict[str, float]:
    """One ratio for every conv layer, or check a per-layer mapping's names and values.

    Raises:
        SpecError: a model without conv layers, or ratios outside [0, 1).
        UnknownNameError: a layer name that is not a conv layer (the available ones listed).
    """
    names = conv_layer_names(model)
    if not names:
        layers = ", ".join(f"{n} ({type(m).__name__})" for n, m in model.named_children())
        raise SpecError(f"the model has no conv layers to prune (layers: {layers}); filter "
                        "pruning needs a conv net such as scn or wk-small.")
    if isinstance(ratio, Mapping):
        for name in ratio:
            if name not in names:
                raise unknown_name("conv layer", name, names)
        resolved = {n: float(ratio[n]) for n in names if n in ratio}
    else:
        resolved = {n: float(ratio) for n in names}
    convs = _convs(model)
    for name, r in resolved.items():
        filters_to_remove(convs[name].out_channels, r, name)
    return resolved


def kept_filters(model: nn.Module, ratios: float | Mapping[str, float]) -> dict[str, Tensor]:
    """For each pruned conv layer, the indices of the filters that stay, in ascending order."""
    convs = _convs(model)
    kept = {}
    for name, r in resolve_ratios(model, ratios).items():
        conv = convs[name]
        remove = filters_to_remove(conv.out_channels, r, name)
        kept[name] = l1_filter_ranking(conv)[remove:].sort().values
    return kept


def prune_filters(model: nn.Sequential, ratios: float | Mapping[str, float]) -> nn.Sequential:
    """A smaller copy of `model` without the weakest filters of each conv layer (L1 norm).

    Args:
        model: A flat ``nn.Sequential`` (the zoo's architectures); left unchanged.
        ratios: Fraction of filters to remove, in [0, 1): one for every conv layer, or per
            layer name (``{"conv1": 0.5, "conv2": 0.7}``); ``round(ratio * filters)`` go.
    Returns:
        A new ``nn.Sequential`` with the same layer names and smaller widths, in the same
        train/eval mode, dtype and device. Before any fine-tuning its outputs equal those of
        `model` with the removed filters' channels zeroed.
    Raises:
        SpecError: bad ratios, no conv layers, or a layer after a pruned conv that has no
            pruning rule (only BatchNorm2d, channel-wise layers, Conv2d, and Flatten + Linear).
        UnknownNameError: a name in `ratios` that is not a conv layer.
    """
    kept = kept_filters(model, ratios)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels: Tensor | None = None   # the kept channels of the current feature map, if pruned
    producer = ""                    # the conv layer that produced them
    produced = 0                     # its original number of filters
    flat = False
    for name, layer in model.named_children():
        if isinstance(layer, nn.Conv2d):
            if flat:
                raise SpecError(f"cannot prune around {name}: a conv layer after a flatten.")
            layers[name] = _slice_conv(name, layer, kept.get(name), channels)
            if name in kept:
                channels, producer, produced = kept[name], name, layer.out_channels
            else:
                channels = None
        elif channels is None:
            layers[name] = copy.deepcopy(layer)
            flat = flat or isinstance(layer, nn.Flatten)
        elif isinstance(layer, nn.BatchNorm2d) and not flat:
            layers[name] = _slice_batchnorm(layer, channels)
        elif isinstance(layer, nn.Flatten):
            layers[name] = copy.deepcopy(layer)
            flat = True
        elif isinstance(layer, nn.Linear) and flat:
            layers[name] = _slice_linear(name, layer, channels, produced, producer)
            channels = None
        elif isinstance(layer, _CHANNELWISE) and not flat:
            layers[name] = copy.deepcopy(layer)
        else:
            raise SpecError(f"cannot prune {producer}: layer {name} ({type(layer).__name__}) "
                            "follows it and has no pruning rule; supported are BatchNorm2d, "
                            "ReLU-like and pooling layers, Conv2d, and Flatten then Linear.")
    if channels is not None:
        raise SpecError(f"cannot prune {producer}: its channels are the model's output.")
    pruned = nn.Sequential(layers)
    pruned.train(model.training)
    return pruned


def _slice_conv(name: str, conv: nn.Conv2d, out_keep: Tensor | None,
                in_keep: Tensor | None) -> nn.Conv2d:
    if conv.groups != 1:
        raise SpecError(f"cannot prune {name}: grouped convolutions (groups={conv.groups}) are "
                        "not supported.")
    weight = conv.weight.detach()
    if out_keep is not None:
        weight = weight[out_keep]
    if in_keep is not None:
        weight = weight[:, in_keep]
    pair = tuple[int, int]
    new = nn.Conv2d(weight.shape[1], weight.shape[0], cast(pair, conv.kernel_size),
                    stride=cast(pair, conv.stride), padding=cast("str | pair", conv.padding),
                    dilation=cast(pair, conv.dilation), bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None and new.bias is not None:
            bias = conv.bias.detach()
            new.bias.copy_(bias[out_keep] if out_keep is not None else bias)
    new.train(conv.training)
    return new


def _slice_batchnorm(bn: nn.BatchNorm2d, keep: Tensor) -> nn.BatchNorm2d:
    ref = bn.weight if bn.weight is not None else bn.running_mean
    new = nn.BatchNorm2d(len(keep), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats,
                         device=ref.device if ref is not None else None,
                         dtype=ref.dtype if ref is not None else None)
    with torch.no_grad():
        for attr in ("weight", "bias", "running_mean", "running_var"):
            src, dst = getattr(bn, attr), getattr(new, attr)
            if src is not None and dst is not None:
                dst.copy_(src.detach()[keep])
        if bn.num_batches_tracked is not None and new.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def _slice_linear(name: str, linear: nn.Linear, keep: Tensor, channels: int,
                  producer: str) -> nn.Linear:
    if linear.in_features % channels:
        raise SpecError(f"cannot prune {producer}: {name} has {linear.in_features} inputs, not a "
                        f"multiple of its {channels} channels.")
    area = linear.in_features // channels   # H * W of the flattened map
    features = (keep[:, None] * area + torch.arange(area)).flatten()
    weight = linear.weight.detach()[:, features]
    new = nn.Linear(weight.shape[1], linear.out_features, bias=linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
    new.train(linear.training)
    return new


# ---------------------------------------------------------------------------------------------
# Sensitivity (Li et al. Fig. 2)


@dataclass(frozen=True)
class SensitivityRow:
    """One conv layer pruned alone at one ratio. Accuracies are fractions in [0, 1]."""

    layer: str
    filters: int
    ratio: float
    removed: int
    accuracy: float
    baseline: float

    @property
    def drop(self) -> float:
        return self.baseline - self.accuracy


def sensitivity_scan(model: nn.Sequential, dataset: Any,
                     ratios: Sequence[float] = DEFAULT_SCAN_RATIOS, *, batch_size: int = 512,
                     device: str | torch.device | None = None) -> list[SensitivityRow]:
    """Prune each conv layer alone at each ratio and measure the accuracy, no fine-tuning.

    Ratios that would remove every filter of a layer are skipped for that layer.

    Args:
        model: The model to probe; left unchanged.
        dataset: Evaluation samples (``ImageDataset`` or anything with ``len`` and ``take``).
        ratios: Fractions of filters to remove, each in [0, 1).
    Returns:
        One :class:`SensitivityRow` per (layer, ratio), layer by layer.
    """
    from certify.train.loops import evaluate

    names = conv_layer_names(model)
    if not names:
        resolve_ratios(model, 0.0)   # raises the "no conv layers" error
    for r in ratios:
        if not 0.0 <= r < 1.0:
            raise SpecError(f"sensitivity ratios must be in [0, 1), got {r}.")
    baseline = evaluate(model, dataset, batch_size=batch_size, device=device)
    convs = _convs(model)
    rows = []
    for name in names:
        n = convs[name].out_channels
        for r in ratios:
            removed = math.floor(r * n + 0.5)
            if removed >= n:
                continue
            pruned = prune_filters(model, {name: r})
            acc = evaluate(pruned, dataset, batch_size=batch_size, device=device)
            rows.append(SensitivityRow(name, n, float(r), removed, acc, baseline))
    return rows


def sensitivity_columns() -> list[Any]:
    from certify.train._tables import Column, percent

    return [Column("layer", "Layer"), Column("filters", "Filters"),
            Column("ratio", "Ratio", lambda v: f"{v:g}"), Column("removed", "Removed"),
            Column("accuracy", "Accuracy", percent), Column("drop", "Drop", percent)]


def sensitivity_table_rows(rows: Sequence[SensitivityRow]) -> list[dict[str, Any]]:
    return [{"layer": r.layer, "filters": r.filters, "ratio": r.ratio, "removed": r.removed,
             "accuracy": r.accuracy, "drop": r.drop} for r in rows]


# ---------------------------------------------------------------------------------------------
# Pruning a checkpoint (thesis Table 8.10)


@dataclass(frozen=True, eq=False)
class PruneOutcome:
    """A pruned (and maybe fine-tuned) model, and the before/after table.

    Attributes:
        model: The pruned model (eval mode, CPU).
        meta: Its metadata (``parent`` is the input's sha256, ``training`` the recipe).
        path: Where it was saved, or ``None``.
        ratios: The per-layer ratios applied.
        widths: ``{layer: (filters before, filters after)}``.
        rows: Table 8.10 rows: name, parameters, conv_parameters, test_accuracy.
        result: The fine-tuning run, or ``None`` without fine-tuning.
    """

    model: nn.Sequential
    meta: ModelMeta
    path: Path | None
    ratios: dict[str, float]
    widths: dict[str, tuple[int, int]]
    rows: tuple[dict[str, Any], ...]
    result: TrainResult | None


def prune_columns() -> list[Any]:
    from certify.train._tables import Column, count, percent

    return [Column("name", "Name"), Column("parameters", "Number of Parameters", count),
            Column("conv_parameters", "Conv Parameters", count),
            Column("test_accuracy", "Accuracy Test Set", percent)]


def prune_checkpoint(path: str | os.PathLike[str], ratios: float | Mapping[str, float], *,
                     finetune: TrainConfig | None = None, distill_from_parent: bool = False,
                     temperature: float = 2.0, alpha: float = 0.9,
                     data_dir: str | os.PathLike[str] | None = None,
                     output: str | os.PathLike[str] | None = None, resume: bool = False,
                     device: str = "cpu", quiet: bool = False) -> PruneOutcome:
    """Prune the checkpoint at `path`, optionally fine-tune, measure, and save.

    Args:
        path: The model to prune (a conv net of the zoo).
        ratios: One ratio for every conv layer, or per layer (``{"conv1": 0.5}``).
        finetune: Fine-tuning recipe on the model's training split; ``None`` for none.
        distill_from_parent: Fine-tune with Hinton's loss from the unpruned model (at
            `temperature`, weight `alpha`) instead of plain cross-entropy.
        temperature, alpha: Distillation settings for ``distill_from_parent``.
        data_dir: Where the model's dataset is.
        output: Where to save the pruned model (atomically), or ``None``.
        resume: Continue interrupted fine-tuning from ``<output>.partial``.
        device: Where to evaluate (fine-tuning uses ``finetune.device``).
        quiet: No progress output.
    Returns:
        A :class:`PruneOutcome` with the before/after table.
    Raises:
        CheckpointError, DatasetError: a bad model file or missing data.
        SpecError, UnknownNameError: bad ratios or layer names, a model without conv layers.
    """
    from certify.checkpoint import build_model, checkpoint_sha256, load_checkpoint, save_checkpoint
    from certify.data import get_dataset_info, load_dataset
    from certify.model_io import require_checkpoint
    from certify.nets import arch_kwargs_of, count_parameters
    from certify.train.distill import DistillLoss
    from certify.train.loops import (
        cross_entropy_loss,
        discard_train_state,
        evaluate,
        partial_path,
        predict_logits,
        train,
    )
    from certify.utils import resolve_device

    path = Path(path)
    require_checkpoint(path, "prune")
    dev = resolve_device(device)
    model, meta = load_checkpoint(path, device=dev)
    resolved = resolve_ratios(model, ratios)
    if distill_from_parent and finetune is None:
        raise SpecError("{distill_from_parent} needs fine-tuning; pass {finetune} (the "
                        "fine-tuning recipe).", distill_from_parent=NAME, finetune=NAME)
    info = get_dataset_info(meta.dataset)
    test_set = load_dataset(info.name, "test", data_dir)
    before = evaluate(model, test_set, device=dev)
    pruned = prune_filters(model, resolved).eval()
    new_meta_kwargs = {**meta.arch_kwargs, **arch_kwargs_of(pruned)}
    after_prune = evaluate(pruned, test_set, device=dev)
    name = Path(output).stem if output is not None else f"{path.stem}-pruned"
    rows: list[dict[str, Any]] = [
        {"name": path.stem, "parameters": count_parameters(model),
         "conv_parameters": conv_parameters(model), "test_accuracy": before},
        {"name": f"{name} (before fine-tuning)" if finetune else name,
         "parameters": count_parameters(pruned), "conv_parameters": conv_parameters(pruned),
         "test_accuracy": after_prune},
    ]
    result = None
    final = after_prune
    state = None
    if finetune is not None:
        train_set = load_dataset(info.name, "train", data_dir)
        if distill_from_parent:
            loss: Any = DistillLoss("hinton", predict_logits(model, train_set), temperature, alpha)
        else:
            loss = cross_entropy_loss
        state = partial_path(output) if output is not None else None
        pruned.train()
        result = train(pruned, train_set, test_set, finetune, loss, state_path=state,
                       resume=resume, tag="prune-finetune", quiet=quiet)
        final = evaluate(pruned, test_set, device=dev) if result.test_accuracy is None \
            else result.test_accuracy
        rows.append({"name": f"{name} (fine-tuned {finetune.epochs} epochs)",
                     "parameters": count_parameters(pruned),
                     "conv_parameters": conv_parameters(pruned), "test_accuracy": final})
    pruned.cpu().eval()
    convs = _convs(model)
    pruned_convs = _convs(pruned)
    widths = {n: (convs[n].out_channels, pruned_convs[n].out_channels)
              for n in conv_layer_names(model)}
    sha = checkpoint_sha256(path)
    recipe: dict[str, Any] = {
        "command": "prune", "method": "l1-filter", "strategy": "independent",
        "ratios": resolved, "widths_before": {n: w[0] for n, w in widths.items()},
        "parent": str(path), "parent_sha256": sha,
        "finetune_epochs": finetune.epochs if finetune else 0,
        "distill_from_parent": bool(distill_from_parent),
        "temperature": float(temperature) if distill_from_parent else None,
        "alpha": float(alpha) if distill_from_parent else None,
        "parent_training": meta.training,
    }
    if finetune is not None:
        recipe.update(finetune.to_dict())
    metrics = {"test_accuracy": float(final), "test_accuracy_before": float(before),
               "test_accuracy_pruned": float(after_prune),
               "parameters_before": count_parameters(model),
               "parameters": count_parameters(pruned)}
    new_meta = meta.with_updates(arch_kwargs=new_meta_kwargs, training=recipe, parent=sha,
                                 metrics=metrics, certify_version="")
    build_model(new_meta).load_state_dict(pruned.state_dict())   # same architecture, new widths
    if output is not None:
        save_checkpoint(output, pruned, new_meta)
        discard_train_state(state)
    if not quiet:
        changes = ", ".join(f"{n} {a}->{b}" for n, (a, b) in widths.items())
        print(f"pruned filters: {changes}", file=sys.stderr)
    return PruneOutcome(pruned, new_meta, Path(output) if output is not None else None,
                        resolved, widths, tuple(rows), result)
