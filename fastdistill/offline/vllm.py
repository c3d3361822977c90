"""Served teachers: vLLM-style ``logprobs`` / ``prompt_logprobs`` into top-k tensors.

A vLLM request that asks for ``logprobs=k`` (generated tokens) or ``prompt_logprobs=k`` returns,
per position, a mapping from token id to a logprob (an object with ``.logprob``, or a number);
the first prompt position has none (``None``), and the sampled / actual token is added to the
top k when it is not among them (k + 1 entries). These functions keep the k most likely entries
of each position, best first, as the ``(indices, logprobs)`` of ``teacher_topk`` (and of the
offline store). The logprobs are used as given: ask the server for them at the loss's
temperature.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Tuple

import torch


def _value(v) -> float:
    return float(v.logprob if hasattr(v, "logprob") else v)


def topk_from_logprob_maps(positions: Sequence[Optional[Mapping[int, Any]]],
                           k: Optional[int] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices [L, k] int64, logprobs [L, k] float32, mask [L] bool)`` from one mapping
    (token id -> logprob) per position; ``mask`` is False where a position has none (its row
    holds the indices 0..k-1 and logprobs 0, which must not count). ``k`` defaults to the
    smallest mapping; a mapping with fewer than k entries is a ValueError. Ties are broken by
    the smaller token id."""
    sizes = [len(p) for p in positions if p is not None]
    if not sizes:
        raise ValueError("no position has logprobs")
    if k is None:
        k = min(sizes)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    L = len(positions)
    idx = torch.arange(k, dtype=torch.int64).repeat(L, 1)
    lp = torch.zeros(L, k, dtype=torch.float32)
    mask = torch.zeros(L, dtype=torch.bool)
    for t, p in enumerate(positions):
        if p is None:
            continue
        if len(p) < k:
            raise ValueError(f"position {t} has {len(p)} logprobs, fewer than k={k}")
        items = sorted(((_value(v), int(tok)) for tok, v in p.items()),
                       key=lambda x: (-x[0] if not math.isnan(x[0]) else math.inf, x[1]))[:k]
        idx[t] = torch.tensor([tok for _, tok in items], dtype=torch.int64)
        lp[t] = torch.tensor([v for v, _ in items], dtype=torch.float32)
        mask[t] = True
    return idx, lp, mask


def from_vllm_output(output, k: Optional[int] = None, *, prompt: bool = True,
                     completion: bool = True
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids [L], indices [L, k], logprobs [L, k], mask [L])`` of one vLLM
    ``RequestOutput`` (``prompt_token_ids``, ``prompt_logprobs``, ``outputs[0].token_ids``,
    ``outputs[0].logprobs``), aligned with the logits of a model run on ``input_ids``: row t is
    the teacher's distribution of token t + 1. ``prompt`` / ``completion``: whether the rows
    predicting prompt / completion tokens count (``mask``); the last row never does."""
    p_ids = list(output.prompt_token_ids)
    comp = output.outputs[0] if getattr(output, "outputs", None) else None
    c_ids = list(comp.token_ids) if comp is not None else []
    ids = p_ids + c_ids
    if not ids:
        raise ValueError("the request has no tokens")
    rows: list = []
    p_lp = getattr(output, "prompt_logprobs", None)
    for i in range(1, len(p_ids)):  # prompt_logprobs[i]: token i given the tokens before it
        rows.append(p_lp[i] if prompt and p_lp is not None else None)
    c_lp = getattr(comp, "logprobs", None) if comp is not None else None
    for j in range(len(c_ids)):
        rows.append(c_lp[j] if completion and c_lp is not None else None)
    rows.append(None)  # the last token predicts nothing here
    if len(p_ids) == 0:
        rows = rows[1:]
    idx, lp, mask = topk_from_logprob_maps(rows, k)
    return torch.tensor(ids, dtype=torch.int64), idx, lp, mask
