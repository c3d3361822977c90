"""The factor that turns summed row losses into the reduced loss."""

from __future__ import annotations

from typing import Optional

import torch


def reduction_scale(reduction: str, n_rows: int, valid_count: Optional[torch.Tensor],
                    num_items, device) -> torch.Tensor:
    """0-d float32 factor computed on the device (no host sync): 1 for sum / none,
    1 / num_items_in_batch, or 1 / max(#valid rows, 1) (so an all-ignored batch gives 0)."""
    if reduction != "mean":
        return torch.ones((), dtype=torch.float32, device=device)
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            return 1.0 / num_items.reshape(()).to(device=device, dtype=torch.float32)
        return torch.full((), 1.0 / num_items, dtype=torch.float32, device=device)
    if valid_count is not None:
        return 1.0 / valid_count.clamp_min(1).to(torch.float32)
    return torch.full((), 1.0 / max(n_rows, 1), dtype=torch.float32, device=device)
