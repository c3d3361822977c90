"""The distillation demo: ``python -m fastdistill.demo`` (``make demo``)."""
