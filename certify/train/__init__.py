"""Training recipes on one shared loop: standard, robust, distillation, L1 filter pruning.

A recipe is a loss function plugged into :func:`train` (see :mod:`certify.train.loops`); every
recipe writes a checkpoint whose ``ModelMeta.training`` and ``parent`` record its provenance.
"""

from certify.train.distill import (
    DistillLoss,
    distill,
    distill_sweep,
    hinton_loss,
    logit_matching_loss,
    soft_target_loss,
)
from certify.train.loops import (
    EpochRecord,
    Step,
    TemperatureCrossEntropy,
    TrainConfig,
    TrainResult,
    cross_entropy_loss,
    evaluate,
    predict_logits,
    train,
)
from certify.train.prune import (
    l1_filter_ranking,
    prune_checkpoint,
    prune_filters,
    sensitivity_scan,
)
from certify.train.robust import (
    RobustConfig,
    RobustEval,
    RobustLoss,
    evaluate_robust,
    retrain_checkpoint,
    robust_cross_entropy,
    robust_fit,
    train_robust,
)
from certify.train.schedules import EpsSchedule
from certify.train.standard import TrainedModel, evaluate_checkpoint, init_model, train_standard

__all__ = [
    "DistillLoss",
    "EpochRecord",
    "EpsSchedule",
    "RobustConfig",
    "RobustEval",
    "RobustLoss",
    "Step",
    "TemperatureCrossEntropy",
    "TrainConfig",
    "TrainResult",
    "TrainedModel",
    "cross_entropy_loss",
    "distill",
    "distill_sweep",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_robust",
    "hinton_loss",
    "init_model",
    "l1_filter_ranking",
    "logit_matching_loss",
    "predict_logits",
    "prune_checkpoint",
    "prune_filters",
    "retrain_checkpoint",
    "robust_cross_entropy",
    "robust_fit",
    "sensitivity_scan",
    "soft_target_loss",
    "train",
    "train_robust",
    "train_standard",
]
