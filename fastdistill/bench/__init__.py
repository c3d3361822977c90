"""Benchmarks: ``python -m fastdistill.bench`` (the ``fastdistill-bench`` console script).

cases.py defines the ops and the providers compared on them (fastdistill's backends, torch
eager, torch.compile, Liger-Kernel); measure.py times them and measures their peak extra memory;
__main__.py sweeps sizes, prints a table and writes CSV and PNG plots.
"""
