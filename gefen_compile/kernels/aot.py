"""Ahead-of-time compilation of the CUDA kernels for real GPU targets, on any machine (no GPU).

Triton's interpreter, which runs the kernels on CPU tensors in CI, accepts code that no GPU
compiler does; this compiles what the real launchers (kernels/triton_step.py, Gefen's step, and
kernels/triton_momentum.py, GefenMuon's momentum) would launch for given buckets and
parameters, through Triton's own JIT (same argument specialisation, constexprs and options),
for a target such as sm_90, and reads registers, spills and the SASS from the cubin with the
tools Triton's wheels carry. Used by tests/test_triton_aot.py and
benchmarks/bench_gpu_static.py:

    python -m gefen_compile.kernels.aot --arch 80 90

prints one line per compiled specialisation (a non-zero exit on any compile error). Run it with
another Triton on ``PYTHONPATH`` to check that version. ``TRITON_INTERPRET`` must be unset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# A realistic mixed bucket: (shape, period) pairs covering every class the launcher makes:
# period 1 with 256-element magnitude blocks (per-element second moment) and with short blocks
# of a prime length, the usual periods of language models (64 .. 1024, 768 masked to 1024
# columns), rows longer than 1024 (column chunks), and row lengths that are not multiples of 16.
MIXED_BUCKET = (
    ((768,), 1), ((37,), 1), ((6, 7), 1), ((64, 64), 64), ((32, 128), 128), ((4, 768), 768),
    ((8, 1024), 1024), ((4, 2048), 2048), ((12, 40), 40), ((9, 3), 3), ((4, 3072), 3072),
    ((1000,), 1),  # robust variant: three rows of 256, then a short last row of 232
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# GefenMuon's matrices, as (shape, magnitude block): blocks of 64 (many rows to a tile), 256 with
# a short last row (a robust period-1 matrix of 1000 elements: 232 left), a row of 768 (masked
# to 1024 columns), 3072 (column chunks), and 40 (not a multiple of 16: no 128-bit accesses).
MOMENTUM_PARAMETERS = (((32, 64), 64), ((10, 100), 256), ((4, 768), 768), ((2, 3072), 3072),
                       ((12, 40), 40))
KERNELS = ("step", "momentum")


@dataclass
class CompiledSpecialisation:
    """One compiled specialisation of a kernel (``kernel``: one of KERNELS) and what its cubin
    shows."""

    kernel: str
    arch: int
    dtype: str
    constexprs: dict
    registers: int
    spills: int  # local-memory stores and loads in the SASS
    stack_bytes: int
    sass_instructions: int
    global_loads: dict  # width in bits -> count in the SASS
    global_stores: dict
    shared_bytes: int


class _TargetDriver:
    """Stands in for Triton's active driver: a GPU target, and no device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return f"aot-sm_{self.target.arch}"  # Triton keys its caches by this

    def get_current_stream(self, device=None):
        return 0


@contextmanager
def _compiling_for(arch: int, compiled: list):
    """Within: the launchers compile for ``arch`` and record kernels, launching nothing."""
    from triton.runtime.driver import driver

    from . import triton_momentum, triton_step

    if not hasattr(triton_step._gefen_step_kernel, "warmup"):
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset")
    launchers = (triton_step, triton_momentum)
    launches, previous = [m._launch for m in launchers], driver._active  # None: no GPU driver
    driver.set_active(_TargetDriver(arch))

    def compile_only(kernel, grid, args, meta):
        compiled.append((kernel.warmup(*args, grid=grid, **meta), meta))

    for module in launchers:
        module._launch = compile_only
    try:
        yield
    finally:
        for module, launch in zip(launchers, launches):
            module._launch = launch
        driver._active = previous


def bucket_inputs(dtype: torch.dtype, shapes=MIXED_BUCKET, unaligned: bool = False):
    """The arguments of ``gefen::step_`` for a CPU bucket of ``shapes`` (with their periods),
    built as Gefen builds its buckets; ``unaligned``: one gradient is a view one element into
    its storage, as user code can make it."""
    from ..codebook import NearestCode
    from ..optim import hyper_table
    from ..state import build_bucket
    from ..variant import ROBUST
    from . import StepInputs

    params = [torch.zeros(shape, dtype=dtype) for shape, _ in shapes]
    grads = [torch.zeros(shape, dtype=dtype) for shape, _ in shapes]
    if unaligned:
        grads[0] = torch.zeros(grads[0].numel() + 1, dtype=dtype)[1:].view(grads[0].shape)
    bucket = build_bucket(params, [0] * len(params), [{"period": p} for _, p in shapes], dtype,
                          ROBUST)
    nearest = NearestCode(torch.linspace(-1, 1, 256))
    t = nearest.tables("cpu", torch.float64 if dtype == torch.float64 else torch.float32)
    groups = [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
               "maximize": False}]
    return StepInputs(
        bucket.params, grads, bucket.codes, bucket.magnitude, bucket.vmean, bucket.steps,
        bucket.segments, bucket.num_rows, bucket.param_group, hyper_table(groups, "cpu"),
        t.codebook, t.lut, t.bounds, t.first_index, t.half, *bucket.work_plan(),
    )


def compile_step(arch: int, dtype: torch.dtype, unaligned: bool = False) -> list:
    """Every specialisation the launcher produces for the mixed bucket, compiled for ``arch``:
    (Triton's compiled kernel, the launch's constexprs and options) pairs."""
    from . import triton_step

    compiled: list = []
    with _compiling_for(arch, compiled):
        triton_step.step(*bucket_inputs(dtype, unaligned=unaligned))
    return compiled


def compile_momentum(arch: int, dtype: torch.dtype, unaligned: bool = False) -> list:
    """Every specialisation GefenMuon's momentum launcher produces for MOMENTUM_PARAMETERS,
    Nesterov or not, compiled for ``arch`` (as :func:`compile_step`); ``unaligned``: each
    gradient a view one element into its storage."""
    from ..codebook import NearestCode
    from . import triton_momentum

    tables = NearestCode(torch.linspace(-1, 1, 256)).tables("cpu", torch.float32)
    compiled: list = []
    with _compiling_for(arch, compiled):
        for shape, block in MOMENTUM_PARAMETERS:
            n = shape[0] * shape[1]
            grad = torch.zeros(n + unaligned, dtype=dtype)[int(unaligned):].view(shape)
            codes = torch.zeros(n, dtype=torch.uint8)
            magnitude = torch.zeros(-(-n // block), dtype=dtype)
            for nesterov in (True, False):
                triton_momentum.momentum_step(grad, codes, magnitude, block=block,
                                              tables=tables, momentum=0.95, nesterov=nesterov)
    return compiled


def inspect_cubin(cubin: bytes) -> dict:
    """Registers, local (spill) bytes, shared bytes and SASS statistics of a cubin."""
    tools = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", f.name], check=True,
                              capture_output=True, text=True).stdout
    resources = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    instructions = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    # Registers saved to and restored from local memory: spills (the stack frame of the IEEE
    # division's slow path shows as STACK without any).
    spills = sum(op.startswith(("STL", "LDL")) for op in instructions)
    loads, stores = Counter(), Counter()
    for op in instructions:
        kind = loads if op.startswith("LDG") else stores if op.startswith("STG") else None
        if kind is not None:
            width = re.search(r"\.(8|16|32|64|128|U8|S8|U16|S16)\b", op)
            bits = width.group(1).lstrip("US") if width else "32"  # LDG.E is 32 bits
            kind[int(bits)] += 1
    return {
        "registers": int(resources.get("REG", 0)),
        "spills": spills,
        "stack_bytes": int(resources.get("STACK", 0)) + int(resources.get("LOCAL", 0)),
        "shared_bytes": int(resources.get("SHARED", 0)),
        "sass_instructions": len(instructions),
        "global_loads": dict(sorted(loads.items())),
        "global_stores": dict(sorted(stores.items())),
    }


def specialisations(archs=(80, 90), dtypes=tuple(DTYPES),
                    kernels=KERNELS) -> list[CompiledSpecialisation]:
    """Compile and inspect every specialisation of ``kernels`` for every target and dtype."""
    compilers = {"step": compile_step, "momentum": compile_momentum}
    results = []
    for arch in archs:
        for name in dtypes:
            for kernel_name in kernels:
                for unaligned in (False, True):
                    for kernel, meta in compilers[kernel_name](arch, DTYPES[name], unaligned):
                        constexprs = {k: str(v) if not isinstance(v, (bool, int)) else v
                                      for k, v in meta.items() if k.isupper() or k == "num_warps"}
                        results.append(CompiledSpecialisation(
                            kernel=kernel_name, arch=arch, dtype=name, constexprs=constexprs,
                            **inspect_cubin(kernel.asm["cubin"]),
                        ))
    return _unique(results)


def _unique(results: list[CompiledSpecialisation]) -> list[CompiledSpecialisation]:
    seen, unique = set(), []
    for r in results:
        key = (r.kernel, r.arch, r.dtype, json.dumps(r.constexprs, sort_keys=True))
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def parsed_specialisations(parser: argparse.ArgumentParser, argv: list[str] | None = None
                           ) -> tuple[argparse.Namespace, list]:
    """``parser``'s arguments with --arch, --dtype and --kernel added, and the
    specialisations they choose, compiled (this module's command line, and
    benchmarks/bench_gpu_static.py's)."""
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    return args, specialisations(args.arch, args.dtype, args.kernel)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results to this file")
    args, results = parsed_specialisations(parser, argv)
    import triton

    for r in results:
        print(f"triton {triton.__version__} {r.kernel} sm_{r.arch} {r.dtype} {r.constexprs} "
              f"regs={r.registers} spills={r.spills} loads={r.global_loads} "
              f"stores={r.global_stores}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"triton": triton.__version__, "kernels": [asdict(r) for r in results]}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
