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
from models import MODELS, TensorKind, format_table, numel, structured_grad

GIB = 2**30


@dataclass(frozen=True)
class Measured:
    """What one ``Gefen.step()`` allocated for one tensor of a shape, and AdamW's equivalent."""

    period: int
    gefen_bytes: int
    adamw_bytes: int


@torch.no_grad()
def measure(shape: tuple[int, ...], dtype: torch.dtype) -> Measured:
    """Step a one-parameter Gefen once on ``shape`` and read its ``memory_report``."""
    param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
    param.grad = structured_grad(shape, dtype)
    optimizer = Gefen([param])
    optimizer.step()
    (row,) = memory_report(optimizer).tensors
    return Measured(row.period, row.gefen_bytes, row.baseline_bytes)


def measure_model(kinds: list[TensorKind], dtype: torch.dtype) -> dict[tuple[int, ...], Measured]:
    """One measurement per distinct shape, largest first so peak memory is reached early."""
    shapes = sorted({k.shape for k in kinds}, key=numel, reverse=True)
    return {shape: measure(shape, dtype) for shape in shapes}


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
            f"{m.gefen_bytes / numel(k.shape):.3f}",
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
