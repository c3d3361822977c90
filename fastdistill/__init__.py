"""fastdistill: fused, memory-frugal knowledge-distillation losses for large language models.

Public API (see README.md and fastdistill.functional for the exact semantics)::

    fd.distill_loss(student_logits, teacher_logits, labels=None, *, divergence=..., ...)
    fd.feature_loss(student, teacher, *, kind="mse", mask=None, projection=None, ...)
    fd.linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                           labels=None, *, teacher_logits=None, ..., chunk_size=None, mode="auto")
    fd.DistillLoss(**options)(student_logits, teacher_logits, labels=None)
    fd.LinearDistillLoss(**options)(student_hidden, student_weight, teacher_hidden,
                                    teacher_weight, labels=None)
    fd.FeatureDistillLoss(layer_map, student_dims, teacher_dims, ...)(student_hidden_states,
                                                                      teacher_hidden_states)
    fd.LayerMap.uniform(Ls, Lt) / .last(k, Ls, Lt) / .explicit(pairs, Ls, Lt)
    fd.ProgressiveLayerDrop(...), fd.StochasticLayerDrop(...)   (layer-pair schedules)
"""

from fastdistill._version import __version__
from fastdistill import backends, divergences, ops  # noqa: F401  (ops registers the custom ops)
from fastdistill.backends import BackendUnavailableError
from fastdistill.divergences import DIVERGENCES as _ALL_DIVERGENCES
DIVERGENCES = _ALL_DIVERGENCES[:6]  # symmetric_kl lands with its kernels
from fastdistill.functional import FEATURE_KINDS, distill_loss, feature_loss
from fastdistill.linear import linear_distill_loss
from fastdistill.losses import DistillLoss, LinearDistillLoss
from fastdistill.losses import DistillLoss
from fastdistill.layers import LayerMap, LayerSchedule, ProgressiveLayerDrop, StochasticLayerDrop
from fastdistill.feature_distill import FeatureDistillLoss
from fastdistill.student import make_student

__all__ = [
    "__version__",
    "distill_loss",
    "feature_loss",
    "linear_distill_loss",
    "DistillLoss",
    "LinearDistillLoss",
    "FeatureDistillLoss",
    "LayerMap",
    "LayerSchedule",
    "ProgressiveLayerDrop",
    "StochasticLayerDrop",
    "DIVERGENCES",
    "FEATURE_KINDS",
    "BackendUnavailableError",
    "make_student",
]


def __getattr__(name):
    # fd.integrations loads on first use (its submodules import transformers / TRL)
    if name == "integrations":
        import importlib
        return importlib.import_module("fastdistill.integrations")
    raise AttributeError(f"module 'fastdistill' has no attribute {name!r}")
