"""The networks of the suite that ``examples/`` does not already define.

The GPT-2-style model reuses ``train_gpt``'s transformer block and initialisation, with a BPE
vocabulary instead of bytes. The Llama-style model differs from it in every part Gefen's
period inference and second-moment sharing could be sensitive to (RMSNorm gains without
biases, a SwiGLU MLP with three matrices, separate q/k/v projections, an untied output head),
so that the two language models cover different tensor shapes and gradient structures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .data import train_gpt

INIT_STD = 0.02


@dataclass(frozen=True)
class LMShape:
    """A transformer's size; the same shape gives both language models similar compute."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int


def _shrink_residual_writes(model: nn.Module, suffixes: tuple[str, ...], n_layer: int) -> None:
    """GPT-2's initialisation: matrices that write into the residual stream get std
    0.02 / sqrt(2 n_layer), so the stream's variance does not grow with depth."""
    for name, p in model.named_parameters():
        if name.endswith(suffixes):
            nn.init.normal_(p, std=INIT_STD / math.sqrt(2 * n_layer))


class GPT2(nn.Module):
    """GPT-2 style: learned positions, pre-LayerNorm ``train_gpt.Block``s (GELU MLP), a final
    LayerNorm, and the output head tied to the token embedding."""

    def __init__(self, shape: LMShape) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(shape.vocab_size, shape.n_embd)
        self.pos_emb = nn.Embedding(shape.block_size, shape.n_embd)
        self.blocks = nn.ModuleList(
            train_gpt.Block(shape.n_embd, shape.n_head) for _ in range(shape.n_layer)
        )
        self.ln_f = nn.LayerNorm(shape.n_embd)
        self.head = nn.Linear(shape.n_embd, shape.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        self.apply(train_gpt.GPT._init_weights)
        _shrink_residual_writes(self, ("attn.proj.weight", "mlp.2.weight"), shape.n_layer)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class Rotary(nn.Module):
    """Rotary position embedding: rotates each (first-half, second-half) pair of a head's
    query and key channels by an angle proportional to the position."""

    def __init__(self, head_dim: int, block_size: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
        # Buffers, not parameters: the optimizers never see them; not saved either.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (batch, head, time, head_dim)."""
        cos, sin = self.cos[: x.shape[2]], self.sin[: x.shape[2]]
        a, b = x.chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


class LlamaAttention(nn.Module):
    """Causal multi-head attention with rotary positions and no biases."""

    def __init__(self, shape: LMShape) -> None:
        super().__init__()
        d = shape.n_embd
        self.n_head = shape.n_head
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(d, d, bias=False) for _ in range(4)
        )
        self.rotary = Rotary(d // shape.n_head, shape.block_size)

    def forward(self, x: Tensor) -> Tensor:
        batch, time_, d = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, time_, self.n_head, d // self.n_head).transpose(1, 2)

        q = self.rotary(heads(self.q_proj(x)))
        k = self.rotary(heads(self.k_proj(x)))
        y = F.scaled_dot_product_attention(q, k, heads(self.v_proj(x)), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(batch, time_, d))


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)), hidden width ~8/3 of the model's, rounded up
    to a multiple of 64 (as Llama rounds to its multiple_of)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        hidden = 64 * math.ceil(8 * d / 3 / 64)
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """Pre-RMSNorm block: attention, then SwiGLU, each residual."""

    def __init__(self, shape: LMShape) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(shape.n_embd, eps=1e-6)
        self.attn = LlamaAttention(shape)
        self.mlp_norm = nn.RMSNorm(shape.n_embd, eps=1e-6)
        self.mlp = SwiGLU(shape.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Llama style: token embedding (no position embedding: rotary), RMSNorm blocks with
    SwiGLU, a final RMSNorm, and a separate (untied) output head; no biases anywhere."""

    def __init__(self, shape: LMShape) -> None:
        super().__init__()
        self.embed = nn.Embedding(shape.vocab_size, shape.n_embd)
        self.blocks = nn.ModuleList(LlamaBlock(shape) for _ in range(shape.n_layer))
        self.norm = nn.RMSNorm(shape.n_embd, eps=1e-6)
        self.head = nn.Linear(shape.n_embd, shape.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=INIT_STD)
        _shrink_residual_writes(self, ("o_proj.weight", "down_proj.weight"), shape.n_layer)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions with BatchNorm and ReLU (8x8 -> pool -> 4x4 -> global average),
    then a linear classifier: BatchNorm's per-channel gains and biases, and conv kernels of a
    few hundred elements, are tensor shapes the language models do not have."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU()]

        self.net = nn.Sequential(
            *conv(1, width), *conv(width, 2 * width), nn.MaxPool2d(2),
            *conv(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * width, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def mlp(inputs: int, hidden: int, outputs: int, activation: str) -> nn.Sequential:
    """One hidden layer: Linear, activation, Linear (PyTorch's default initialisation)."""
    return nn.Sequential(nn.Linear(inputs, hidden), ACTIVATIONS[activation](),
                         nn.Linear(hidden, outputs))
