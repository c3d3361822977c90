"""``python -m fastdistill.offline``: top-k teacher extraction and inspection.

    python -m fastdistill.offline extract --model my_pkg.teachers:build --factory \\
        --data tokens.pt --k 64 --temperature 1.0 --out topk/ --seq-len 512 --batch-size 8
    python -m fastdistill.offline extract --hf-model Qwen/Qwen2.5-0.5B --data corpus.txt \\
        --k 64 --out topk/                    # tokenised with the model's own tokenizer
    python -m fastdistill.offline info topk/

The teacher: ``--model MODULE:NAME`` (a callable that maps input ids [B, L] to logits, e.g. an
nn.Module; with ``--factory``, NAME is called with no arguments to build it) or ``--hf-model``
(a Hugging Face causal LM, loaded with transformers). The data: a ``.pt`` / ``.npy`` file of
token ids (1-D: a stream cut into windows of ``--seq-len``; 2-D: one sequence per row) or a
text file (tokenised with ``--tokenizer`` or the model's tokenizer). Rerunning the same command
continues after the last stored sequence.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import torch


def _load_model(args):
    if args.hf_model:
        from transformers import AutoModelForCausalLM
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        model = AutoModelForCausalLM.from_pretrained(args.hf_model, torch_dtype=dtype)
        return model.eval(), args.tokenizer or args.hf_model
    mod, _, name = args.model.partition(":")
    if not name:
        raise SystemExit("--model must be MODULE:NAME")
    sys.path.insert(0, os.getcwd())
    obj = getattr(importlib.import_module(mod), name)
    if args.factory:
        obj = obj()
    if not callable(obj):
        raise SystemExit(f"{args.model} is not callable (pass --factory if it builds the model)")
    if isinstance(obj, torch.nn.Module):
        obj.eval()
    return obj, args.tokenizer


def _tokens(args, tokenizer_name):
    path = args.data
    tok = None
    if path.endswith(".pt"):
        ids = torch.load(path)
    elif path.endswith(".npy"):
        import numpy as np
        ids = torch.from_numpy(np.load(path))
    else:
        if not tokenizer_name:
            raise SystemExit("a text file needs --tokenizer (or --hf-model)")
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer_name)
        with open(path, encoding="utf-8") as f:
            ids = torch.tensor(tok(f.read())["input_ids"], dtype=torch.int64)
    ids = torch.as_tensor(ids).to(torch.int64)
    if ids.dim() == 1:
        n = ids.numel() // args.seq_len
        if n == 0:
            raise SystemExit(f"{path} holds {ids.numel()} tokens, fewer than --seq-len")
        ids = ids[:n * args.seq_len].reshape(n, args.seq_len)
    if ids.dim() != 2:
        raise SystemExit(f"{path}: expected 1-D or 2-D token ids, got shape {tuple(ids.shape)}")
    if tok is None and tokenizer_name:
        # fingerprint the tokenizer itself when there is one to load (a Hugging Face model, or
        # a local path); any other --tokenizer is recorded as the name given
        if args.hf_model or os.path.exists(tokenizer_name):
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(tokenizer_name)
        else:
            tok = str(tokenizer_name)
    return ids, tok


def extract(args) -> int:
    from fastdistill.offline import extract_topk
    model, tokenizer_name = _load_model(args)
    ids, tok = _tokens(args, tokenizer_name)
    if args.max_sequences:
        ids = ids[:args.max_sequences]
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(model, torch.nn.Module):
        model.to(device)
    batches = (ids[b:b + args.batch_size] for b in range(0, ids.shape[0], args.batch_size))
    m = extract_topk(model, batches, args.k, args.temperature, args.out, tokenizer=tok,
                     vocab_size=args.vocab_size, device=device, shard_tokens=args.shard_tokens,
                     total_tokens=ids.numel())
    print(json.dumps({key: m[key] for key in ("sequences", "tokens", "bytes",
                                              "bytes_per_token", "k", "temperature",
                                              "vocab_size", "tokenizer")}))
    return 0


def info(args) -> int:
    from fastdistill.offline import read_manifest
    m = read_manifest(args.dir)
    if m is None:
        raise SystemExit(f"no top-k manifest in {args.dir}")
    per_tok = m["bytes"] / max(m["tokens"], 1)
    print(f"{args.dir}: {m['sequences']} sequences, {m['tokens']} tokens, {len(m['shards'])} "
          f"shard(s), {m['bytes'] / 2**20:.1f} MiB ({per_tok:.1f} bytes/token) | k={m['k']} "
          f"temperature={m['temperature']} vocab_size={m['vocab_size']} "
          f"tokenizer={m['tokenizer']}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastdistill.offline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="run a teacher and store its top-k distributions")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="MODULE:NAME of a callable mapping input ids to logits")
    src.add_argument("--hf-model", help="a Hugging Face causal LM (name or path)")
    e.add_argument("--factory", action="store_true", help="call NAME() to build the model")
    e.add_argument("--tokenizer", help="tokenizer name or path (fingerprinted in the manifest)")
    e.add_argument("--data", required=True, help=".pt / .npy token ids, or a text file")
    e.add_argument("--k", type=int, required=True)
    e.add_argument("--temperature", type=float, default=1.0)
    e.add_argument("--out", required=True)
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--vocab-size", type=int, default=None,
                   help="keep the first columns only (padded vocabularies)")
    e.add_argument("--shard-tokens", type=int, default=1 << 20)
    e.add_argument("--max-sequences", type=int, default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="weights of --hf-model")
    e.set_defaults(fn=extract)
    i = sub.add_parser("info", help="summarise a top-k directory")
    i.add_argument("dir")
    i.set_defaults(fn=info)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
