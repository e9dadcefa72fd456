"""Optimizer-state bytes per parameter of Gefen and of AdamW, for GPT-2 small and Llama 3.2 1B.

    python benchmarks/bench_memory.py [--model {gpt2,llama1b,all}] [--dtype {float32,bfloat16}]

The bytes are measured, not computed from a formula: for every parameter shape of the model a
real ``gefen_compile.Gefen`` takes one ``step()`` on a parameter of that shape, and
``gefen_compile.memory_report`` reads the state it allocated (and what ``torch.optim.AdamW``
would hold for the same parameter).

Each DISTINCT shape is stepped once, in its own one-parameter optimizer, and its bytes are
multiplied by the number of tensors of that shape in the model. This is exact: a tensor's state
bytes depend only on its shape, its dtype and the period inferred from its first gradient, not
on the codebook the optimizer learns, and tensors of one shape get gradients of one structure
here. It keeps peak memory at one tensor's worth (Llama's tied embedding alone is 263M elements)
instead of the whole model's.

The first gradients are synthetic but structured, as period inference needs: a 2-D weight of
shape (out, in) gets ``row_scale[out, 1] * col_scale[1, in] * randn`` with log-normal scales,
so each row of the weight (one output unit, or one token's embedding) has its own gradient
scale, as real gradients do, and the period found is the row length (cut down to a divisor just
above 1024 when longer, as GEFEN_SPEC "Period inference" says). A 1-D tensor (bias, norm
weight) gets plain ``randn`` times a scale, with no structure to find: the spec's peak rule then
gives period 1 (about 5 bytes per parameter, as published) or, on a short vector where the
scores of the few large candidate blocks are noisy, whichever such noise peak is highest. Either
way these tensors are a negligible share of the parameters.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from gefen_compile import Gefen, memory_report

# Log-normal spreads of the per-row and per-column gradient scales: rows (output units, tokens)
# differ a lot in real gradients, columns (input features) less.
ROW_LOG_STD = 1.0
COL_LOG_STD = 0.5
# Overall gradient size; any value gives the same periods and bytes (scores use log g^2 and
# differences of block means, which a constant factor does not change).
GRAD_SCALE = 1e-3
SEED = 0
GIB = 2**30


@dataclass(frozen=True)
class TensorKind:
    """Parameters of one role in a model: all of one shape."""

    name: str
    shape: tuple[int, ...]
    count: int

    @property
    def numel(self) -> int:
        return self.count * _numel(self.shape)


@dataclass(frozen=True)
class Measured:
    """What one ``Gefen.step()`` allocated for one tensor of a shape, and AdamW's equivalent."""

    period: int
    gefen_bytes: int
    adamw_bytes: int


def gpt2_small() -> list[TensorKind]:
    """GPT-2 small (124M) as in HF / nanoGPT, with nn.Linear (out, in) weight layouts and the
    lm_head tied to wte (so it has no parameter of its own)."""
    vocab, d, layers, ctx = 50257, 768, 12, 1024
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


def llama_1b() -> list[TensorKind]:
    """Llama 3.2 1B: grouped-query attention (32 query, 8 KV heads of 64), SwiGLU MLP, RMSNorm,
    no biases, embeddings tied to the lm_head."""
    vocab, d, layers, ffn, kv = 128256, 2048, 16, 8192, 8 * 64
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


def _numel(shape: tuple[int, ...]) -> int:
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


@torch.no_grad()
def measure(shape: tuple[int, ...], dtype: torch.dtype) -> Measured:
    """Step a one-parameter Gefen once on ``shape`` and read its ``memory_report``."""
    param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
    param.grad = structured_grad(shape, dtype)
    optimizer = Gefen([param])
    optimizer.step()
    (row,) = memory_report(optimizer).tensors
    return Measured(row.period, row.gefen_bytes, row.adamw_bytes)


def measure_model(kinds: list[TensorKind], dtype: torch.dtype) -> dict[tuple[int, ...], Measured]:
    """One measurement per distinct shape, largest first so peak memory is reached early."""
    shapes = sorted({k.shape for k in kinds}, key=_numel, reverse=True)
    return {shape: measure(shape, dtype) for shape in shapes}


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int) -> str:
    """Columns aligned; the first ``left`` columns left-justified, the rest (numbers) right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def report(title: str, kinds: list[TensorKind], measured: dict, dtype: torch.dtype) -> str:
    """The per-kind table and the model's totals."""
    header = ("tensor kind", "shape", "count", "period", "Gefen bytes", "AdamW bytes",
              "Gefen B/param")
    rows = []
    for k in kinds:
        m = measured[k.shape]
        rows.append((
            k.name,
            "x".join(map(str, k.shape)),
            str(k.count),
            str(m.period),
            f"{k.count * m.gefen_bytes:,}",
            f"{k.count * m.adamw_bytes:,}",
            f"{m.gefen_bytes / _numel(k.shape):.3f}",
        ))
    params = sum(k.numel for k in kinds)
    gefen = sum(k.count * measured[k.shape].gefen_bytes for k in kinds)
    adamw = sum(k.count * measured[k.shape].adamw_bytes for k in kinds)
    gefen_bpp, adamw_bpp = gefen / params, adamw / params
    dtype_name = str(dtype).removeprefix("torch.")
    totals = [
        f"parameters                    {params:,}",
        f"Gefen state                   {gefen:,} bytes = {gefen_bpp:.3f} bytes/param",
        f"AdamW state                   {adamw:,} bytes = {adamw_bpp:.3f} bytes/param"
        f" (exp_avg, exp_avg_sq in {dtype_name})",
        f"AdamW / Gefen                 {adamw / gefen:.2f}x",
        f"saved per billion parameters  {(adamw_bpp - gefen_bpp) * 1e9 / GIB:.2f} GiB",
    ]
    return "\n".join([
        f"{title}, {dtype_name} parameters and gradients",
        "",
        format_table(header, rows, left=2),
        "",
        *totals,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    names = list(MODELS) if args.model == "all" else [args.model]
    for i, name in enumerate(names):
        title, build = MODELS[name]
        kinds = build()
        start = time.perf_counter()
        measured = measure_model(kinds, dtype)
        if i:
            print()
        print(report(title, kinds, measured, dtype))
        print(f"(measured in {time.perf_counter() - start:.0f} s: one Gefen step per distinct "
              f"shape, {len(measured)} shapes)")


if __name__ == "__main__":
    main()
