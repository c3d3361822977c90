"""fastdistill: fused, memory-frugal knowledge-distillation losses for large language models.

Public API (see README.md and the functions' docstrings for the exact semantics)::

    fd.distill_loss(student_logits, teacher_logits, labels=None, *, divergence=..., ...)
    fd.linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                           labels=None, *, teacher_logits=None, ..., chunk_size=None, mode="auto")
    fd.feature_loss(student, teacher, *, kind="mse", mask=None, projection=None, ...)
    fd.DistillConfig(...)                         (every option, validated once)
    fd.DistillLoss(...), fd.LinearDistillLoss(...)  (modules; options or config=)
    fd.FeatureDistillLoss(layer_map, student_dims, teacher_dims, ...)
    fd.LayerMap.uniform(Ls, Lt) / .last(k, Ls, Lt) / .explicit(pairs, Ls, Lt)
    fd.ProgressiveLayerDrop(...), fd.StochasticLayerDrop(...)   (layer-pair schedules)
    fd.distill_loss(s, None, labels, teacher_topk=(indices, logprobs), topk_tail="bucket")
    fd.offline.extract_topk(model, batches, k, temperature, out_dir)   (top-k teachers on disk)
"""

from fastdistill._version import __version__
from fastdistill import backends, divergences, ops, reference  # noqa: F401 (ops registers ops)
from fastdistill.backends import BackendUnavailableError
from fastdistill.config import FEATURE_KINDS, DistillConfig
from fastdistill.divergences import DIVERGENCES
from fastdistill.functional import distill_loss, feature_loss
from fastdistill.linear import linear_distill_loss
from fastdistill.losses import DistillLoss, LinearDistillLoss
from fastdistill.layers import LayerMap, LayerSchedule, ProgressiveLayerDrop, StochasticLayerDrop
from fastdistill.feature_distill import FeatureDistillLoss
from fastdistill.student import make_student
from fastdistill import offline  # noqa: F401,E402 (safetensors / tqdm load only when used)

__all__ = [
    "__version__",
    "distill_loss",
    "feature_loss",
    "linear_distill_loss",
    "DistillConfig",
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
