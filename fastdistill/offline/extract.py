"""``extract_topk``: a teacher's top-k distributions over a stream of batches, to disk.

The teacher is any callable that returns logits ``[B, L, V]`` (a tensor, a tuple whose first
element is the logits, or an object with ``.logits``, as a Hugging Face model returns); a
batch is a tensor of input ids ``[B, L]`` (the teacher is called as ``model(batch)``) or a dict
(``model(**batch)``) whose ``attention_mask``, when present, selects the positions kept. The
top-k comes from the fused temperature-softmax + top-k (fastdistill.offline.topk), and the rows
go to a :class:`~fastdistill.offline.store.TopkWriter` directory.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, Iterable, Optional

import torch

from fastdistill.offline.store import TopkWriter, read_manifest, tokenizer_fingerprint
from fastdistill.offline.topk import topk_logprobs


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError("the model must return logits: a tensor [B, L, V], a tuple whose first "
                    f"element they are, or an object with .logits; got {type(out).__name__}")


def _rows(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return v.shape[0]
    raise TypeError("a batch must be a tensor of input ids [B, L] or a dict of tensors (the "
                    f"model's keyword arguments), got {type(batch).__name__}")


def _slice(batch, a: int):
    if isinstance(batch, torch.Tensor):
        return batch[a:]
    return {k: (v[a:] if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
            for k, v in batch.items()}


def _to(batch, device):
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class _Bar:
    """tqdm when it is installed (imported here only), else a line every few seconds."""

    def __init__(self, total, initial, show):
        self.show, self.bar, self.t = show, None, 0.0
        if not show:
            return
        try:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="tok", unit_scale=True,
                            desc="top-k extraction", file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self, n, **post):
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(post, refresh=False)
        elif self.show and time.time() - self.t > 5:
            self.t = time.time()
            print(f"top-k extraction: {post}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def extract_topk(model, batches: Iterable, k: int, temperature: float, out_dir: str, *,
                 tokenizer=None, vocab_size: Optional[int] = None, device=None,
                 shard_tokens: int = 1 << 20, total_tokens: Optional[int] = None,
                 max_sequences: Optional[int] = None, backend: str = "auto",
                 progress: bool = True) -> Dict[str, Any]:
    """Runs ``model`` over ``batches`` and stores the top-``k`` log-probabilities of
    softmax(logits / ``temperature``) of every kept position in ``out_dir``.

    Args:
        model: a callable returning logits (see the module doc), e.g. a Hugging Face causal LM.
        batches: an iterable of input-id tensors ``[B, L]`` or dicts of model inputs; the same
            sequence of batches on every run (resuming skips the stored sequences).
        k: entries per position; temperature: the loss's temperature (the stored logprobs are
            used as given by ``teacher_topk``).
        out_dir: the directory (created; an existing one with a manifest is continued: its k,
            temperature, vocabulary size and tokenizer must match).
        tokenizer: recorded as a fingerprint (fastdistill.offline.tokenizer_fingerprint), so a
            student cannot be trained on ids from another tokenizer by mistake.
        vocab_size: keep only the first ``vocab_size`` logit columns (padded vocabularies).
        device: where the batches go (default: where they are).
        shard_tokens: rows per shard (at batch granularity).
        total_tokens: for the progress bar's total (optional).
        max_sequences: stop after this many stored sequences.
        backend: of the fused top-k: "auto", "triton" or "torch".
        progress: show a progress bar (tqdm when installed) and print a summary.

    Returns:
        the manifest (dict) with ``sequences``, ``tokens``, ``bytes``, ``shards`` and
        ``bytes_per_token``.
    """
    fp = tokenizer if isinstance(tokenizer, str) else tokenizer_fingerprint(tokenizer)
    existing = read_manifest(out_dir)
    skip = existing["sequences"] if existing else 0  # stored by an earlier run: not again
    stored_tokens = existing["tokens"] if existing else 0
    writer, m = None, None
    bar = _Bar(total_tokens, stored_tokens, progress)
    t0 = time.time()
    new_tokens = 0
    try:
        for batch in batches:
            B = _rows(batch)
            if skip >= B:
                skip -= B
                continue
            if skip:  # a partly stored batch: run the rest only
                batch, B, skip = _slice(batch, skip), B - skip, 0
            if max_sequences is not None and writer is not None and \
                    writer.sequences >= max_sequences:
                break
            inputs = _to(batch, device)
            logits = _logits(model(**inputs) if isinstance(inputs, dict) else model(inputs))
            if logits.dim() != 3 or logits.shape[0] != B:
                raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}, "
                                 f"expected [B={B}, L, V]")
            V = vocab_size or logits.shape[-1]
            if writer is None:
                writer = TopkWriter(out_dir, k, temperature, V, fp, shard_tokens)
            idx, lp = topk_logprobs(logits[..., :V], k, temperature, backend=backend)
            ids = inputs if isinstance(inputs, torch.Tensor) else inputs.get("input_ids")
            mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            idx, lp = idx.cpu(), lp.cpu()
            ids = ids.cpu() if isinstance(ids, torch.Tensor) else None
            mask = mask.cpu().bool() if isinstance(mask, torch.Tensor) else None
            n_tok = 0
            for b in range(B):
                if max_sequences is not None and writer.sequences >= max_sequences:
                    break
                sel = mask[b] if mask is not None else slice(None)
                writer.add(idx[b][sel], lp[b][sel], ids[b][sel] if ids is not None else None)
                n_tok += idx[b][sel].shape[0]
            new_tokens += n_tok
            per_tok = writer.manifest["bytes"] / max(writer.manifest["tokens"], 1)
            bar.update(n_tok, **({"bytes/token": f"{per_tok:.1f}"} if per_tok else {}))
    finally:
        bar.close()
        if writer is not None:
            m = writer.close()
    if m is None and existing is not None:  # everything was stored already
        for key, v in (("k", k), ("temperature", float(temperature)), ("tokenizer", fp)):
            if existing[key] != v:
                raise ValueError(f"{out_dir} holds top-k data with {key}={existing[key]!r}, this "
                                 f"run has {key}={v!r}; use another out_dir")
        m = existing
    if m is None:
        raise ValueError("batches was empty: nothing to extract")
    m = dict(m, bytes_per_token=m["bytes"] / max(m["tokens"], 1),
             seconds=time.time() - t0, new_tokens=new_tokens)
    if progress:
        print(f"top-k extraction: {m['sequences']} sequences, {m['tokens']} tokens in "
              f"{len(m['shards'])} shard(s) at {out_dir}: {m['bytes_per_token']:.1f} bytes per "
              f"token (k={k}: int32 indices + bf16 logprobs = {6 * k} bytes, plus offsets and "
              f"ids)", file=sys.stderr)
    return m
