"""Parameter shapes of the benchmarked models, and synthetic structured first gradients.

Shared by the benchmarks in this folder; each model can be built with fewer layers or a smaller
vocabulary, so that a CPU run keeps the shapes but not the size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Log-normal spreads of the per-row and per-column gradient scales: rows (output units, tokens)
# differ a lot in real gradients, columns (input features) less.
ROW_LOG_STD = 1.0
COL_LOG_STD = 0.5
# Overall gradient size; any value gives the same periods and bytes (scores use log g^2 and
# differences of block means, which a constant factor does not change).
GRAD_SCALE = 1e-3
SEED = 0


@dataclass(frozen=True)
class TensorKind:
    """Parameters of one role in a model: all of one shape."""

    name: str
    shape: tuple[int, ...]
    count: int

    @property
    def numel(self) -> int:
        return self.count * numel(self.shape)


def gpt2_small(layers: int = 12, vocab: int = 50257) -> list[TensorKind]:
    """GPT-2 small (124M) as in HF / nanoGPT, with nn.Linear (out, in) weight layouts and the
    lm_head tied to wte (so it has no parameter of its own)."""
    d, ctx = 768, 1024
    return [
        TensorKind("wte (tied lm_head)", (vocab, d), 1),
        TensorKind("wpe", (ctx, d), 1),
        TensorKind("ln_1, ln_2 weight+bias", (d,), 4 * layers),
        TensorKind("attn.c_attn.weight", (3 * d, d), layers),
        TensorKind("attn.c_attn.bias", (3 * d,), layers),
        TensorKind("attn.c_proj.weight", (d, d), layers),
        TensorKind("attn.c_proj.bias", (d,), layers),
        TensorKind("mlp.c_fc.weight", (4 * d, d), layers),
        TensorKind("mlp.c_fc.bias", (4 * d,), layers),
        TensorKind("mlp.c_proj.weight", (d, 4 * d), layers),
        TensorKind("mlp.c_proj.bias", (d,), layers),
        TensorKind("ln_f weight+bias", (d,), 2),
    ]


def llama_1b(layers: int = 16, vocab: int = 128256) -> list[TensorKind]:
    """Llama 3.2 1B: grouped-query attention (32 query, 8 KV heads of 64), SwiGLU MLP, RMSNorm,
    no biases, embeddings tied to the lm_head."""
    d, ffn, kv = 2048, 8192, 8 * 64
    return [
        TensorKind("embed_tokens (tied lm_head)", (vocab, d), 1),
        TensorKind("self_attn.q_proj, o_proj", (d, d), 2 * layers),
        TensorKind("self_attn.k_proj, v_proj", (kv, d), 2 * layers),
        TensorKind("mlp.gate_proj, up_proj", (ffn, d), 2 * layers),
        TensorKind("mlp.down_proj", (d, ffn), layers),
        TensorKind("input/post_attention_layernorm", (d,), 2 * layers),
        TensorKind("norm", (d,), 1),
    ]


MODELS = {"gpt2": ("GPT-2 small (124M)", gpt2_small), "llama1b": ("Llama 3.2 1B", llama_1b)}


def numel(shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel()


def _log_normal(size: int, log_std: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(size, generator=generator) * log_std).exp_()


def structured_grad(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A synthetic first gradient with per-row and per-column scales (see the module docstring).

    Built in place in ``dtype``, so the largest tensor never needs an fp32 copy beside it.
    """
    generator = torch.Generator().manual_seed(SEED)
    grad = torch.randn(shape, generator=generator, dtype=dtype).mul_(GRAD_SCALE)
    if len(shape) == 2:
        rows, cols = shape
        grad.mul_(_log_normal(rows, ROW_LOG_STD, generator).to(dtype).unsqueeze(1))
        grad.mul_(_log_normal(cols, COL_LOG_STD, generator).to(dtype).unsqueeze(0))
    return grad


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int) -> str:
    """Columns aligned; the first ``left`` columns left-justified, the rest (numbers) right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


