"""Tiny Hugging Face causal LMs built from configs (no downloads) and a plain-PyTorch
distillation loop to check the trainers against."""

from __future__ import annotations

import torch

from fastdistill.reference import reference_distill_loss

V = 48


def llama(hidden=16, layers=2, tie=False, vocab=V, seed=0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=tie, pad_token_id=0,
                      eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(cfg).to(dtype)


def batch_rows(n=8, length=10, seed=0, pad_side="right", prompt=0):
    """Rows with input_ids, attention_mask and labels (-100 at padding and at the first
    ``prompt`` tokens), of random lengths in [length // 2, length]."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        k = int(torch.randint(length // 2, length + 1, (1,), generator=g))
        ids = torch.full((length,), 0, dtype=torch.long)
        real = torch.randint(3, V, (k,), generator=g)
        mask = torch.zeros(length, dtype=torch.long)
        if pad_side == "right":
            ids[:k], mask[:k] = real, 1
        else:
            ids[length - k:], mask[length - k:] = real, 1
        labels = ids.masked_fill(mask == 0, -100)
        if prompt:
            first = int(mask.nonzero()[0])
            labels[first:first + prompt] = -100
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def reference_loss(student, teacher, batch, num_items_in_batch=None, **options):
    """The distillation loss of one micro-batch the plain way: both models' full logits, the
    causal shift by slicing, fastdistill's float64 reference."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    s_logits = student(**inputs).logits
    with torch.no_grad():
        t_logits = teacher(**inputs).logits
    return reference_distill_loss(s_logits[:, :-1], t_logits[:, :-1], batch["labels"][:, 1:],
                                  num_items_in_batch=num_items_in_batch, **options)


def reference_train(student, teacher, rows, *, batch_size, accumulation, steps, lr,
                    **options):
    """SGD over ``rows`` in order: each step sums the micro-batches' token losses and divides
    by the step's label-token count (gradient accumulation done right). Returns the per-step
    losses."""
    opt = torch.optim.SGD(student.parameters(), lr=lr)
    losses = []
    per_step = batch_size * accumulation
    for s in range(steps):
        micro = [collate(rows[s * per_step + i * batch_size: s * per_step + (i + 1) * batch_size])
                 for i in range(accumulation)]
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total = 0.0
        for b in micro:
            loss = reference_loss(student, teacher, b, num_items_in_batch=n, **options)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses
