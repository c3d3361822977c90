"""Trainer integrations: ``fastdistill.integrations.hf`` (a ``transformers.Trainer``) and
``fastdistill.integrations.trl`` (drop-in subclasses of TRL's distillation trainers).

The submodules import transformers / TRL; this package itself imports neither, so
``import fastdistill`` stays free of them. Submodules load on first attribute access.
"""

import importlib

__all__ = ["hf", "trl"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
