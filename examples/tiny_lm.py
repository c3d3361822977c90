"""Shared by the trainer examples: a synthetic language (a sparse random Markov chain over 64
tokens, so that a teacher has something to learn and a student something to inherit), tiny
Llama models built from configs (nothing is downloaded) and a plain training loop for the
teacher."""

from __future__ import annotations

import torch

VOCAB = 64
PAD, BOS = 0, 1


def markov_corpus(n: int, length: int, seed: int = 0, branching: int = 3) -> torch.Tensor:
    """[n, length] token ids: BOS, then a walk where each token has `branching` likely
    successors (ids 2..VOCAB-1)."""
    g = torch.Generator().manual_seed(1234)  # the language is fixed; seed picks the samples
    logits = torch.full((VOCAB, VOCAB), -6.0)
    for a in range(VOCAB):
        nxt = torch.randperm(VOCAB - 2, generator=g)[:branching] + 2
        logits[a, nxt] = torch.tensor([2.0, 1.0, 0.5][:branching])
    probs = torch.softmax(logits[:, 2:], -1)
    g = torch.Generator().manual_seed(seed)
    seq = torch.empty(n, length, dtype=torch.long)
    seq[:, 0] = BOS
    for t in range(1, length):
        seq[:, t] = torch.multinomial(probs[seq[:, t - 1]], 1, generator=g).squeeze(1) + 2
    return seq


def tiny_llama(hidden: int, layers: int, seed: int = 0, heads: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=128,
                      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=PAD)
    return LlamaForCausalLM(cfg)


def train_lm(model, data: torch.Tensor, steps: int, lr: float = 3e-3, batch: int = 32,
             seed: int = 0):
    """Plain next-token cross-entropy (the teacher's pre-training)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = data[torch.randint(0, len(data), (batch,), generator=g)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


@torch.no_grad()
def eval_ce(model, data: torch.Tensor) -> float:
    model.eval()
    return float(model(input_ids=data, labels=data).loss)


def params(model) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e3:.1f}k" if n < 1e6 else f"{n / 1e6:.2f}M"

