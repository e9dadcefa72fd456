"""The C step of this checkout against a baseline build of it, on the same state, interleaved:
the way to tell a kernel change of a few percent from the noise of a shared machine.

    git worktree add /tmp/baseline-src HEAD    # the committed kernel, beside your change
    (cd /tmp/baseline-src && python setup.py build_ext --build-lib /tmp/baseline)
    python benchmarks/bench_kernel_ab.py /tmp/baseline/gefen_compile/kernels/_cpu*.so \\
        [--path avx2] [--shapes 4096x768 16384x64] [--dtype bfloat16] [--steps 41] [--threads 2]

Both libraries step one parameter (rows with per-row gradient scales, so the period is the row
length) from the same state, alternately, on one thread (each call's thread CPU time is taken, so that time the process spends
descheduled does not count) or on several (wall time: the threads' sharing of the memory system is
what such a run measures). Prints the median of each and
their ratio (under 1: this checkout is faster).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from gefen_compile import Gefen
from gefen_compile.kernels import cpu_step, native, prepared
from gefen_compile.kernels.cpu_step import DTYPE_CODES


def step_args(shape: tuple[int, int], dtype: torch.dtype, threads: int = 1) -> tuple:
    """StepArgs of one parameter after its first step, and the tensors they point into."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    p.grad = (torch.randn(shape) * torch.randn(shape[0], 1).exp()).to(dtype)
    optimizer = Gefen([p])
    optimizer.step()
    bucket = optimizer._buckets[0]
    tables = bucket.host_tables()
    prepared.fill_tables(bucket)
    a = optimizer._kernel_args(bucket, [])
    tensors = (*tables, a.param_group, a.hyper, a.codes, a.magnitude, a.vmean, a.steps,
               a.codebook, a.lut, a.bounds, a.first_index)
    args = native.StepArgs(a.num_rows, a.segments.data_ptr(), 1, *(t.data_ptr() for t in tensors),
                           a.first_index.numel(), a.lut_half, threads, cpu_step.MAX_BATCHED_ROW)
    return args, (optimizer, p, tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="the baseline build's _cpu*.so")
    parser.add_argument("--path", choices=native.CPU_PATHS, default=native.cpu_path())
    parser.add_argument("--shapes", nargs="+", default=["4096x768", "16384x64"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"],
                        default="float32")
    parser.add_argument("--steps", type=int, default=41)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    baseline = ctypes.CDLL(args.baseline)
    libraries = {"baseline": baseline, "this checkout": native.library}
    for name, library in libraries.items():
        library.gefen_step.argtypes = [ctypes.POINTER(native.StepArgs), ctypes.c_int]
        library.gefen_cpu_path.argtypes = [ctypes.c_int]
        if library.gefen_cpu_path(native.CPU_PATHS.index(args.path)) < 0:
            raise SystemExit(f"{name}'s library does not run the {args.path} path on this CPU "
                             "(a library built before the path existed has it not); --path "
                             "picks another")
    dtype = getattr(torch, args.dtype)
    print(f"{native.processor_name()}, {args.path} path, {args.dtype}, {args.threads} thread(s), "
          f"medians of {args.steps} interleaved calls")
    for text in args.shapes:
        shape = tuple(int(n) for n in text.split("x"))
        step, _alive = step_args(shape, dtype, args.threads)
        times: dict[str, list[float]] = {name: [] for name in libraries}
        for _ in range(args.steps):
            for name, library in libraries.items():
                start = clock()
                library.gefen_step(ctypes.byref(step), DTYPE_CODES[dtype])
                times[name].append(clock() - start)
        base, this = (statistics.median(times[name]) for name in libraries)
        print(f"{text}: baseline {base * 1e3:.3f} ms, this checkout {this * 1e3:.3f} ms, "
              f"ratio {this / base:.3f}")


if __name__ == "__main__":
    main()
