"""Host (Python) time per tensor of a steady-state Gefen step, with the kernels stubbed out:
what the step costs beyond its kernels, which on a GPU must stay small beside the kernel time.

    python benchmarks/bench_host.py [--tensors 2000] [--repeats 7]

Rows: the CPU path (kernels/prepared.py: gradients read and checked and pointer tables
filled in one C call; the C kernel itself stubbed) and the CUDA launcher's host work (device
pointer and flag tables, alignment, bias corrections, launch arguments), from those prepared
tables as a CUDA step takes it where the C library is built, and through the general path
(per-tensor Python checks) as it takes it without; both run on a CPU bucket with the launches
stubbed, so no GPU is needed. Medians of ``--repeats`` runs of 10 steps each, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gefen_compile import Gefen, ops
from gefen_compile.kernels import native, prepared

try:
    from gefen_compile.kernels import triton_step
except ImportError:  # triton comes with CUDA torch and the [test] extra: the CPU row only
    triton_step = None

prepare, kernel, cpu_runner = prepared.prepare, ops._STEP_KERNELS["cpu"], prepared.RUNNERS["cpu"]
stubbed = lambda *args: None  # noqa: E731


def _general_path(bucket):
    return None  # the general path: it calls the kernel registered for the device


# name: (what takes prepared.prepare's place, the kernel the general path calls, what runs a
# CPU bucket's prepared tables); the C kernel and the launches are stubbed
PATHS = {"CPU path (C kernel stubbed)": (prepare, kernel, stubbed)}
if triton_step is not None:
    PATHS["CUDA launcher, prepared tables (launches stubbed)"] = (
        prepare, kernel, prepared.RUNNERS["cuda"])
    PATHS["CUDA launcher, general path (launches stubbed)"] = (
        _general_path, triton_step.step, stubbed)


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
    if triton_step is None:
        print("triton is not installed (pip install triton): the CUDA launcher's row is left out")
    else:
        launch, triton_step._launch = triton_step._launch, stubbed
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    try:
        for _ in range(args.repeats):
            for name, (prepared_by, general, runner) in PATHS.items():
                prepared.prepare, ops._STEP_KERNELS["cpu"] = prepared_by, general
                prepared.RUNNERS["cpu"] = runner
                start = time.perf_counter()
                for _ in range(10):
                    opt.step()
                times[name].append((time.perf_counter() - start) / 10 / args.tensors)
    finally:
        prepared.prepare, ops._STEP_KERNELS["cpu"] = prepare, kernel
        prepared.RUNNERS["cpu"] = cpu_runner
        if triton_step is not None:
            triton_step._launch = launch
    print(f"{native.processor_name()}, torch {torch.__version__}, "
          f"{args.tensors} tensors of 256 elements, {torch.get_num_threads()} threads")
    for name, values in times.items():
        print(f"{name}: {statistics.median(values) * 1e6:.2f} us per tensor per step")


if __name__ == "__main__":
    main()
