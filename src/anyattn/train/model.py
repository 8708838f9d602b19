"""Models of the training harness: `RecallModel` (Zoology's two-layer recipe for MQAR) and `BlockModel`
(pre-norm blocks with a SwiGLU MLP, for copy and language modelling). Both take their mixer layers already
built (`anyattn.train.mixers.build_pattern`), tie the output to the embedding, and compute
`forward(inputs (B, L) long, positions (B, Q) long | None) -> logits (B, Q | L, vocab)`: only at
`positions` when given.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class GatedShortConv(nn.Module):
    """Zoology's `BaseConv` with a short kernel (Arora et al., 2023, "Zoology"): `y = conv(u) * W u + u`,
    conv a causal depthwise convolution of `kernel_size` taps (with bias), W a linear map (with bias), no
    activation. u, y `(B, L, hidden)`."""

    def __init__(self, hidden: int, kernel_size: int = 3):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(hidden, hidden, kernel_size, groups=hidden, padding=kernel_size - 1)
        self.projection = nn.Linear(hidden, hidden)

    def forward(self, u):
        L = u.shape[1]
        conv = self.conv(u.transpose(1, 2))[..., :L].transpose(1, 2)
        return conv * self.projection(u) + u


def _check_vocab_width(vocab_size, hidden):
    for name, val in (("vocab_size", vocab_size), ("hidden", hidden)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")


def _logits(h, embedding, positions):
    """Tied read-out at `positions` (B, Q) (all positions when None)."""
    if positions is not None:
        if positions.dim() != 2 or positions.shape[0] != h.shape[0]:
            raise ValueError(f"positions must have shape (B={h.shape[0]}, Q), got {tuple(positions.shape)}")
        h = h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))
    return h @ embedding.weight.t()


def _check_inputs(inputs):
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2 or inputs.dtype != torch.long:
        desc = f"{inputs.dtype} {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a (B, L) long tensor, got {desc}")


def _tied_embedding(vocab_size: int, hidden: int, mixers) -> nn.Embedding:
    """The input embedding, also the output projection (tied), N(0, 0.02); checks the sizes and that
    there is at least one mixer layer."""
    _check_vocab_width(vocab_size, hidden)
    if len(mixers) == 0:
        raise ValueError("mixers must hold at least one layer")
    emb = nn.Embedding(vocab_size, hidden)
    nn.init.normal_(emb.weight, std=0.02)
    return emb


class RecallModel(nn.Module):
    """Zoology's MQAR model: embedding (normal, std 0.02; the Linear layers keep PyTorch's initialisation,
    see docs/train.md), layer 0 a `GatedShortConv` (the same for every
    mixer), then one layer per mixer; each layer pre-norm residual `x + layer(LayerNorm(x))`; final LayerNorm;
    tied embeddings; no MLP. mixers: the built mixer layers (one for the two-layer recipe; a hybrid pattern
    stacks several)."""

    def __init__(self, vocab_size: int, hidden: int, mixers, conv_size: int = 3):
        super().__init__()
        self.vocab_size, self.embedding = vocab_size, _tied_embedding(vocab_size, hidden, mixers)
        self.conv = GatedShortConv(hidden, conv_size)
        self.mixers = nn.ModuleList(mixers)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(len(mixers) + 1))
        self.final_norm = nn.LayerNorm(hidden)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        _check_inputs(inputs)
        x = self.embedding(inputs)
        x = x + self.conv(self.norms[0](x))
        for norm, mixer in zip(self.norms[1:], self.mixers):
            x = x + mixer(norm(x))[0]
        return _logits(self.final_norm(x), self.embedding, positions)


class SwiGLU(nn.Module):
    """`W2 (SiLU(W1 x) * W3 x)` (Shazeer, 2020), inner width `ratio * hidden` rounded up to a multiple of 8."""

    def __init__(self, hidden: int, ratio: float = 8 / 3):
        super().__init__()
        inner = 8 * math.ceil(ratio * hidden / 8)
        self.w1 = nn.Linear(hidden, inner, bias=False)
        self.w3 = nn.Linear(hidden, inner, bias=False)
        self.w2 = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """`x + mixer(RMSNorm(x))`, then `x + SwiGLU(RMSNorm(x))`."""

    def __init__(self, hidden: int, mixer: nn.Module, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.mixer, self.mlp = mixer, SwiGLU(hidden, mlp_ratio)

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))


class BlockModel(nn.Module):
    """Language model of pre-norm blocks (`Block`, one per mixer layer), final RMSNorm, tied embeddings
    (normal, std 0.02)."""

    def __init__(self, vocab_size: int, hidden: int, mixers, mlp_ratio: float = 8 / 3):
        super().__init__()
        self.vocab_size, self.embedding = vocab_size, _tied_embedding(vocab_size, hidden, mixers)
        self.blocks = nn.ModuleList(Block(hidden, m, mlp_ratio) for m in mixers)
        self.final_norm = nn.RMSNorm(hidden)

    @property
    def mixers(self):
        return [b.mixer for b in self.blocks]

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        _check_inputs(inputs)
        x = self.embedding(inputs)
        for block in self.blocks:
            x = block(x)
        return _logits(self.final_norm(x), self.embedding, positions)
