"""A small decoder-only transformer language model (pre-LayerNorm GPT blocks, learned positions,
tied input/output embeddings) for the demo. ``forward`` returns the final hidden states; the
lm_head weight is ``model.lm_head_weight`` so that losses can work on hidden states directly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.tok.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] int64 -> final hidden states [B, T, dim]."""
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.ln(x)

    def logits(self, idx):
        return self(idx) @ self.lm_head_weight.t()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, steps: int, generator=None) -> torch.Tensor:
        """Samples `steps` tokens after the prompt idx [1, T0]."""
        for _ in range(steps):
            logits = self.logits(idx[:, -self.context:])[:, -1]
            nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)
            idx = torch.cat([idx, nxt], 1)
        return idx
