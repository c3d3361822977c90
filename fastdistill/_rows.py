"""Which rows (tokens) count, and the factor that reduces their losses.

Shared by every loss over tokens: the labels, the optional ``mask`` and ``shift_labels`` become
one int64 label per row (``ignore_index`` where the row does not count), so that every kernel
only ever tests ``label != ignore_index``; the reduction becomes one float32 factor computed on
the device (no host sync).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from fastdistill import _checks


@dataclass
class Rows:
    """The rows of one call: ``labels [N]`` (None: every row counts), the reduction factor
    ``scale`` (0-d float32), ``per_row`` (reduction "none") and how to shape per-row output."""

    labels: Optional[torch.Tensor]
    scale: torch.Tensor
    per_row: bool
    lead: torch.Size
    shift: bool

    def output(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss as returned to the user: per-row losses in the leading shape (without the
        last position of each sequence with shift_labels), or the reduced 0-d loss."""
        if not self.per_row:
            return loss
        out = loss.reshape(self.lead)
        return out[..., :-1] if self.shift else out


def _shift(x: torch.Tensor, lead: torch.Size, fill) -> torch.Tensor:
    """Flattened rows where position t of each sequence takes the value of t + 1 and the last
    position takes `fill`."""
    L = lead[-1]
    x2 = x.reshape(-1, L)
    pad = torch.full((x2.shape[0], 1), fill, dtype=x2.dtype, device=x2.device)
    return torch.cat([x2[:, 1:], pad], dim=1).reshape(-1)


def _scale(reduction: str, n_rows: int, batch: int, counted: Optional[torch.Tensor],
           user_rows: bool, num_items, device) -> torch.Tensor:
    one = torch.ones((), dtype=torch.float32, device=device)
    if reduction in ("sum", "none"):
        return one
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            n = num_items.reshape(()).to(device=device, dtype=torch.float32)
            # no host sync on a device tensor: a value that is not finite and > 0 gives NaN
            return torch.where(torch.isfinite(n) & (n > 0), 1.0 / n, one * math.nan)
        return one / float(num_items)
    if reduction == "batchmean" and not user_rows:
        return one / max(batch, 1)
    if counted is not None:
        return 1.0 / counted.sum().clamp_min(1).to(torch.float32)
    return one / max(n_rows, 1)


def prepare(lead: torch.Size, batch: int, labels, mask, *, ignore_index: int, reduction: str,
            shift_labels: bool, hard_weight: float, vocab: int, num_items_in_batch,
            device: torch.device, leading_name: str = "student_logits") -> Rows:
    """Checks labels / mask / num_items_in_batch against the leading shape ``lead`` of the
    inputs (``batch`` = the inputs' first dimension, for reduction="batchmean") and returns the
    rows. Raises ValueError / TypeError naming the argument."""
    lab = _checks.labels(labels, lead) if labels is not None else None
    m = _checks.mask(mask, lead) if mask is not None else None
    if hard_weight > 0 and lab is None:
        raise ValueError("hard_weight > 0 needs labels (the hard loss is CE against labels)")
    n_items = _checks.num_items(num_items_in_batch, reduction)
    N = math.prod(lead)
    user_rows = lab is not None or m is not None
    if shift_labels:
        if len(lead) == 0 or lead[-1] < 1:
            raise ValueError(f"shift_labels=True needs a sequence dimension: {leading_name} "
                             f"must be [..., L, V] with L >= 1, got leading shape {tuple(lead)}")
        if lab is not None:
            lab = _shift(lab, lead, ignore_index)
        m = _shift(m, lead, False) if m is not None else \
            _shift(torch.ones(N, dtype=torch.bool, device=device), lead, False)
    if m is not None:
        fill = lab if lab is not None else torch.full((), 0 if ignore_index != 0 else 1,
                                                      dtype=torch.int64, device=device)
        lab = torch.where(m, fill, torch.full((), ignore_index, dtype=torch.int64, device=device))
    if lab is not None and hard_weight > 0:
        _checks.label_range(lab, vocab, ignore_index)
    counted = (lab != ignore_index) if lab is not None else None
    scale = _scale(reduction, N, batch, counted, user_rows, n_items, device)
    return Rows(lab, scale, reduction == "none", lead, shift_labels)


def reduction_scale(reduction: str, n_rows: int, counted: Optional[torch.Tensor],
                    device) -> torch.Tensor:
    """The factor of a feature loss: 1 for sum / none, else 1 / max(#counted rows, 1) (all rows
    when ``counted`` [N] bool is None). 0-d float32 on the device, no host sync."""
    return _scale(reduction, n_rows, n_rows, counted, True, None, device)
