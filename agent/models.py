"""Example models, built in code so that nothing is downloaded at run time.

Any `package.module:callable` that returns an nn.Module (or a plain function) can be
named as a workload's `model`; these two back the configs in configs/.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(d_in: int = 64, hidden: int = 256, d_out: int = 64) -> nn.Module:
    """A two-layer MLP: the smallest workload worth compiling."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff(self.ln2(x))


class Transformer(nn.Module):
    """A small decoder-style stack over token ids (the BRIEF's 4-block, d=256 model)."""

    def __init__(self, vocab: int = 1000, d: int = 256, heads: int = 4, blocks: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*(_Block(d, heads) for _ in range(blocks)))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens)))


def transformer(**kwargs: int) -> nn.Module:
    return Transformer(**kwargs)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """A plain function workload (no module): tanh-approximated GELU."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x.pow(3))))
