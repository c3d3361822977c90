"""Storage of top-k teacher distributions: safetensors shards plus a manifest.

Layout of a directory written by :class:`TopkWriter` (and so by ``extract_topk``)::

    manifest.json                  format, version, k, temperature, vocab_size, tokenizer
                                   fingerprint, dtypes, totals, and one entry per shard
    shard-00000.safetensors        indices   [T, k] int32     the teacher's top-k token ids
                                   logprobs  [T, k] bfloat16  their log-probabilities at the
                                                              temperature, best first
                                   offsets   [S + 1] int64    sequence s is rows
                                                              offsets[s]:offsets[s + 1]
                                   input_ids [T] int32        the tokens (when known)
                                   metadata: the manifest's fields, as strings

Row t of a sequence is the teacher's distribution at its t-th token: the prediction of the
next token, aligned with the student's logits at the same position (train with labels
shifted as usual, e.g. ``shift_labels=True``).

The manifest is replaced atomically after every shard, so a run that stops keeps every shard
it finished, and a new run on the same directory continues after the last stored sequence
(:func:`fastdistill.offline.extract_topk` skips that many sequences of its batches).
``safetensors`` is imported only here, when a shard is written or read.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
import torch.utils.data

FORMAT = "fastdistill-topk"
VERSION = 1
MANIFEST = "manifest.json"


def _safetensors():
    try:
        import safetensors.torch
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - exercised only without the package
        raise ImportError("fastdistill.offline stores top-k shards with safetensors: "
                          "pip install safetensors") from e
    return safetensors.torch, safe_open


def read_manifest(path: str) -> Optional[Dict[str, Any]]:
    """The manifest of a top-k directory, or None when there is none yet."""
    f = os.path.join(path, MANIFEST)
    if not os.path.exists(f):
        return None
    with open(f) as fh:
        m = json.load(fh)
    if m.get("format") != FORMAT:
        raise ValueError(f"{f} is not a {FORMAT} manifest (format {m.get('format')!r})")
    if m.get("version") != VERSION:
        raise ValueError(f"{f} has format version {m.get('version')}, this fastdistill reads "
                         f"version {VERSION}")
    return m


def tokenizer_fingerprint(tokenizer) -> str:
    """A short, stable fingerprint of a tokenizer: sha256 of its vocabulary (``get_vocab()``,
    a ``vocab`` mapping, or the demo BPE's merges), or of the string given; "none" for None."""
    import hashlib
    if tokenizer is None:
        return "none"
    if isinstance(tokenizer, str):
        blob = tokenizer
    elif hasattr(tokenizer, "get_vocab"):
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    elif isinstance(getattr(tokenizer, "vocab", None), dict):
        blob = json.dumps(sorted((str(k), str(v)) for k, v in tokenizer.vocab.items()))
    elif hasattr(tokenizer, "merges"):
        blob = json.dumps([list(map(str, m)) for m in tokenizer.merges])
    else:
        raise TypeError("tokenizer: pass an object with get_vocab() (Hugging Face), a vocab "
                        "dict, merges, or a string that identifies it")
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()[:16]


class TopkWriter:
    """Appends sequences of top-k rows to a directory of shards (see the module doc).

    ``TopkWriter(out_dir, k, temperature, vocab_size, tokenizer="none", shard_tokens=1 << 20)``;
    ``add(indices [L, k], logprobs [L, k], input_ids [L] or None)`` per sequence; ``flush()``
    writes the pending sequences as a shard (also done every ``shard_tokens`` tokens);
    ``close()`` flushes. Opening a directory that already holds a manifest continues it: its
    k, temperature, vocab_size and tokenizer must match (``sequences`` says how many it has).
    """

    def __init__(self, out_dir: str, k: int, temperature: float, vocab_size: int,
                 tokenizer: str = "none", shard_tokens: int = 1 << 20):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < k:
            raise ValueError(f"vocab_size must be an int >= k, got {vocab_size!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.shard_tokens = int(shard_tokens)
        head = dict(format=FORMAT, version=VERSION, k=int(k), temperature=float(temperature),
                    vocab_size=int(vocab_size), tokenizer=str(tokenizer),
                    index_dtype="int32", logprob_dtype="bfloat16")
        old = read_manifest(out_dir)
        if old is not None:
            for key in ("k", "temperature", "vocab_size", "tokenizer"):
                if old[key] != head[key]:
                    raise ValueError(f"{out_dir} holds top-k data with {key}={old[key]!r}, this "
                                     f"run has {key}={head[key]!r}; use another out_dir")
            self.manifest = old
        else:
            self.manifest = dict(head, sequences=0, tokens=0, bytes=0, shards=[])
        self._pending: List[tuple] = []
        self._pending_tokens = 0

    @property
    def sequences(self) -> int:
        """Sequences stored (shards written) plus those pending."""
        return self.manifest["sequences"] + len(self._pending)

    @property
    def tokens(self) -> int:
        return self.manifest["tokens"] + self._pending_tokens

    def add(self, indices: torch.Tensor, logprobs: torch.Tensor,
            input_ids: Optional[torch.Tensor] = None) -> None:
        k = self.manifest["k"]
        if indices.dim() != 2 or indices.shape[1] != k or logprobs.shape != indices.shape:
            raise ValueError(f"indices and logprobs must be [L, {k}] (k of this directory), got "
                             f"{tuple(indices.shape)} and {tuple(logprobs.shape)}")
        if input_ids is not None and input_ids.shape != indices.shape[:1]:
            raise ValueError(f"input_ids must be [L] = [{indices.shape[0]}], got "
                             f"{tuple(input_ids.shape)}")
        if self._pending and (input_ids is None) != (self._pending[0][2] is None):
            raise ValueError("every sequence of a shard has input_ids, or none has")
        self._pending.append((indices.detach().to("cpu", torch.int32),
                              logprobs.detach().to("cpu", torch.bfloat16),
                              input_ids.detach().to("cpu", torch.int32)
                              if input_ids is not None else None))
        self._pending_tokens += indices.shape[0]
        if self._pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        st, _ = _safetensors()
        m = self.manifest
        n = len(m["shards"])
        name = f"shard-{n:05d}.safetensors"
        lengths = torch.tensor([p[0].shape[0] for p in self._pending], dtype=torch.int64)
        tensors = {"indices": torch.cat([p[0] for p in self._pending]),
                   "logprobs": torch.cat([p[1] for p in self._pending]),
                   "offsets": torch.cat([torch.zeros(1, dtype=torch.int64),
                                         lengths.cumsum(0)])}
        if self._pending[0][2] is not None:
            tensors["input_ids"] = torch.cat([p[2] for p in self._pending])
        meta = {key: str(m[key]) for key in ("format", "version", "k", "temperature",
                                             "vocab_size", "tokenizer")}
        meta["first_sequence"] = str(m["sequences"])
        path = os.path.join(self.out_dir, name)
        st.save_file(tensors, path + ".tmp", metadata=meta)
        os.replace(path + ".tmp", path)
        size = os.path.getsize(path)
        m["shards"].append(dict(file=name, first_sequence=m["sequences"],
                                sequences=len(self._pending), tokens=self._pending_tokens,
                                bytes=size))
        m["sequences"] += len(self._pending)
        m["tokens"] += self._pending_tokens
        m["bytes"] += size
        tmp = os.path.join(self.out_dir, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(m, f, indent=1)
        os.replace(tmp, os.path.join(self.out_dir, MANIFEST))
        self._pending, self._pending_tokens = [], 0

    def close(self) -> Dict[str, Any]:
        self.flush()
        return self.manifest


class TopkDataset(torch.utils.data.Dataset):
    """The stored sequences, in the order they were written: ``ds[i]`` is a dict with
    ``indices [L, k]`` int64, ``logprobs [L, k]`` float32 (``logprob_dtype``), and
    ``input_ids [L]`` int64 when stored. Shards are opened lazily and only the sequence's rows
    are read. Use with ``torch.utils.data.DataLoader(ds, batch_size=B, collate_fn=collate_topk)``
    (no shuffling keeps the batches aligned with the token stream they were extracted from)."""

    def __init__(self, path: str, logprob_dtype: torch.dtype = torch.float32):
        m = read_manifest(path)
        if m is None:
            raise FileNotFoundError(f"no {MANIFEST} in {path}: not a top-k directory (write one "
                                    "with fastdistill.offline.extract_topk)")
        self.path, self.manifest, self.logprob_dtype = path, m, logprob_dtype
        self._starts = [s["first_sequence"] for s in m["shards"]]
        self._open: Dict[int, Any] = {}

    k = property(lambda self: self.manifest["k"])
    temperature = property(lambda self: self.manifest["temperature"])
    vocab_size = property(lambda self: self.manifest["vocab_size"])
    tokenizer = property(lambda self: self.manifest["tokenizer"])

    def __len__(self) -> int:
        return self.manifest["sequences"]

    def _shard(self, j: int):
        if j not in self._open:
            _, safe_open = _safetensors()
            f = safe_open(os.path.join(self.path, self.manifest["shards"][j]["file"]),
                          framework="pt")
            self._open = {j: (f, f.get_tensor("offsets"), "input_ids" in f.keys())}
        return self._open[j]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range [0, {len(self)})")
        j = bisect.bisect_right(self._starts, i) - 1
        f, offsets, has_ids = self._shard(j)
        s = i - self._starts[j]
        a, b = int(offsets[s]), int(offsets[s + 1])
        out = {"indices": f.get_slice("indices")[a:b].to(torch.int64),
               "logprobs": f.get_slice("logprobs")[a:b].to(self.logprob_dtype)}
        if has_ids:
            out["input_ids"] = f.get_slice("input_ids")[a:b].to(torch.int64)
        return out

    def __getstate__(self):  # DataLoader workers open their own files
        d = dict(self.__dict__)
        d["_open"] = {}
        return d


def collate_topk(samples: Sequence[Dict[str, torch.Tensor]], pad_id: int = 0
                 ) -> Dict[str, torch.Tensor]:
    """Pads sequences of a :class:`TopkDataset` to ``[B, L_max, k]``; ``mask [B, L_max]`` is
    True at real positions (pass it as ``mask=``: padded rows hold the indices 0..k-1 and
    logprobs 0, which never count)."""
    B = len(samples)
    L = max(s["indices"].shape[0] for s in samples)
    k = samples[0]["indices"].shape[1]
    idx = torch.arange(k, dtype=torch.int64).expand(B, L, k).clone()
    lp = torch.zeros(B, L, k, dtype=samples[0]["logprobs"].dtype)
    mask = torch.zeros(B, L, dtype=torch.bool)
    ids = torch.full((B, L), pad_id, dtype=torch.int64) if "input_ids" in samples[0] else None
    for b, s in enumerate(samples):
        n = s["indices"].shape[0]
        idx[b, :n], lp[b, :n], mask[b, :n] = s["indices"], s["logprobs"], True
        if ids is not None:
            ids[b, :n] = s["input_ids"]
    out = {"indices": idx, "logprobs": lp, "mask": mask}
    if ids is not None:
        out["input_ids"] = ids
    return out


def iter_batches(path: str, batch_size: int, *, device=None,
                 logprob_dtype: torch.dtype = torch.float32) -> Iterator[Dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` stored sequences in order (collated by :func:`collate_topk`),
    on ``device``: the batches of the extraction when it used the same batch size."""
    ds = TopkDataset(path, logprob_dtype)
    for b0 in range(0, len(ds), batch_size):
        batch = collate_topk([ds[i] for i in range(b0, min(len(ds), b0 + batch_size))])
        yield {key: v.to(device) for key, v in batch.items()} if device is not None else batch
