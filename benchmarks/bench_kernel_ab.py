"""The C step of this checkout against a baseline build of it, on the same state, interleaved:
the way to tell a kernel change of a few percent from the noise of a shared machine.

    git worktree add /tmp/baseline-src HEAD    # the committed kernel, beside your change
    (cd /tmp/baseline-src && python setup.py build_ext --build-lib /tmp/baseline)
    python benchmarks/bench_kernel_ab.py /tmp/baseline/gefen_compile/kernels/_cpu*.so \\
        [--path avx2] [--shapes 4096x768 16384x64] [--dtype bfloat16] [--steps 41] [--threads 2]

or two paths of this checkout's library, the baseline on ``--baseline-path``:

    python benchmarks/bench_kernel_ab.py --baseline-path vbmi --path vbmi_bf16 --dtype bfloat16

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
    parser.add_argument("baseline", nargs="?", help="the baseline build's _cpu*.so")
    parser.add_argument("--path", choices=native.CPU_PATHS, default=native.cpu_path())
    parser.add_argument("--baseline-path", choices=native.CPU_PATHS,
                        help="instead of a baseline build: this checkout on this path")
    parser.add_argument("--shapes", nargs="+", default=["4096x768", "16384x64"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"],
                        default="float32")
    parser.add_argument("--steps", type=int, default=41)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if (args.baseline is None) == (args.baseline_path is None):
        parser.error("give a baseline build's library or --baseline-path, one of them")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    # name: (library, the index of its path)
    runs = {"baseline": (native.library if args.baseline is None else ctypes.CDLL(args.baseline),
                         native.CPU_PATHS.index(args.baseline_path or args.path)),
            "this checkout": (native.library, native.CPU_PATHS.index(args.path))}
    for name, (library, path) in runs.items():
        library.gefen_step.argtypes = [ctypes.POINTER(native.StepArgs), ctypes.c_int]
        library.gefen_cpu_path.argtypes = [ctypes.c_int]
        if library.gefen_cpu_path(path) < 0:
            raise SystemExit(f"{name}'s library does not run the {native.CPU_PATHS[path]} path "
                             "on this CPU (a library built before the path existed has it not); "
                             "--path picks another")
    dtype = getattr(torch, args.dtype)
    against = f" against the {args.baseline_path} path" if args.baseline_path else ""
    print(f"{native.processor_name()}, {args.path} path{against}, {args.dtype}, "
          f"{args.threads} thread(s), medians of {args.steps} interleaved calls")
    for text in args.shapes:
        shape = tuple(int(n) for n in text.split("x"))
        step, _alive = step_args(shape, dtype, args.threads)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.steps):
            for name, (library, path) in runs.items():
                library.gefen_cpu_path(path)  # one library may run both
                start = clock()
                library.gefen_step(ctypes.byref(step), DTYPE_CODES[dtype])
                times[name].append(clock() - start)
        base, this = (statistics.median(times[name]) for name in runs)
        print(f"{text}: baseline {base * 1e3:.3f} ms, this checkout {this * 1e3:.3f} ms, "
              f"ratio {this / base:.3f}")


if __name__ == "__main__":
    main()
