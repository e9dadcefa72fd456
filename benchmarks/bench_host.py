"""Host (Python) time per tensor of a steady-state Gefen step, with the kernels stubbed out:
what the step costs beyond its kernels, which on a GPU must stay small beside the kernel time.

    python benchmarks/bench_host.py [--tensors 2000] [--repeats 7]

Rows: the CPU path (checks, pointer tables, C-kernel call; the C kernel itself stubbed) and the
CUDA launcher's host work (pointer and flag tables, alignment, bias corrections, launch
arguments; run on a CPU bucket with the launches stubbed, so no GPU is needed). Medians of
``--repeats`` runs of 10 steps each, interleaved.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from gefen_compile import Gefen, ops
from gefen_compile.kernels import triton_step

PATHS = {
    "CPU path (C kernel stubbed)": lambda *args: None,
    "CUDA launcher (launches stubbed)": triton_step.step,
}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            return next(names)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 16)) for _ in range(args.tensors)]
    opt = Gefen(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    triton_step._launch = lambda *a: None
    kernel = ops._STEP_KERNELS["cpu"]
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    try:
        for _ in range(args.repeats):
            for name, path in PATHS.items():
                ops._STEP_KERNELS["cpu"] = path
                start = time.perf_counter()
                for _ in range(10):
                    opt.step()
                times[name].append((time.perf_counter() - start) / 10 / args.tensors)
    finally:
        ops._STEP_KERNELS["cpu"] = kernel
    print(f"{cpu_name()}, torch {torch.__version__}, "
          f"{args.tensors} tensors of 256 elements, {torch.get_num_threads()} threads")
    for name, values in times.items():
        print(f"{name}: {statistics.median(values) * 1e6:.2f} us per tensor per step")


if __name__ == "__main__":
    main()
