"""Per-tensor cost of a whole step: the same number of parameters in many small tensors against
a few large ones, Gefen and fused AdamW side by side.

    python benchmarks/bench_many_tensors.py [--elements 8388608] [--small 8000] [--large 8]
                                            [--steps 11] [--threads T]

Each optimizer has its own parameters (rows of 64, gradients with per-row scales); after two
first steps, steps are interleaved and their medians printed, with each optimizer's ratio of
many small tensors to few large ones. By default the gradients stay from step to step, and the
other optimizers' steps run between two of one optimizer's: its tensors' metadata is out of the
caches, a harsh case. With --backward, a backward (untimed) gives each optimizer's parameters
fresh gradients before each of its steps, as in training: new gradient tensors, and metadata
that the forward and backward have just read. Then Gefen's C kernel alone (its tables filled once), the
same way: what of the difference is the kernel's, and what is the host work per tensor; then
Gefen's step in its parts (the tables filled from the tensors, with the parameters' version
counters bumped as they are checked; the kernel; the state's version bump; the held gradients
dropped), per tensor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gefen_compile import Gefen
from gefen_compile.kernels import cpu_step, native, prepared

OPTIMIZERS = {"Gefen": Gefen, "AdamW (fused)": lambda p: torch.optim.AdamW(p, fused=True)}


def tensors(count: int, elements: int) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(elements // count // 64, 64)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn_like(p) * torch.randn(p.shape[0], 1).exp()
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=1 << 23)
    parser.add_argument("--small", type=int, default=8000)
    parser.add_argument("--large", type=int, default=8)
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--backward", action="store_true",
                        help="fresh gradients from a backward before each step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runs = {(name, count): build(tensors(count, args.elements))
            for name, build in OPTIMIZERS.items() for count in (args.large, args.small)}
    for optimizer in runs.values():
        optimizer.step()
        optimizer.step()
    weights = {key: [p.grad for group in o.param_groups for p in group["params"]]
               for key, o in runs.items()}
    times: dict[tuple, list[float]] = {key: [] for key in runs}
    for _ in range(args.steps):
        for key, optimizer in runs.items():
            if args.backward:
                backward(optimizer, weights[key])
            start = time.perf_counter()
            optimizer.step()
            times[key].append(time.perf_counter() - start)
    median = {key: statistics.median(values) for key, values in times.items()}
    between = "a backward before each" if args.backward else "gradients kept"
    print(f"{args.elements / 1e6:.1f}M fp32 parameters, {torch.get_num_threads()} threads, "
          f"median of {args.steps} interleaved steps ({between}); {native.describe()}")
    for name in OPTIMIZERS:
        large, small = median[name, args.large], median[name, args.small]
        print(f"{name}: {args.large} tensors {large * 1e3:.2f} ms, {args.small} tensors "
              f"{small * 1e3:.2f} ms ({small / large:.2f}x)")
    if native.library is not None:
        large, small = kernel_times([runs["Gefen", args.large], runs["Gefen", args.small]],
                                    args.steps)
        print(f"Gefen's C kernel alone: {args.large} tensors {large * 1e3:.2f} ms, {args.small} "
              f"tensors {small * 1e3:.2f} ms ({small / large:.2f}x)")
        for count in (args.large, args.small):
            key = ("Gefen", count)
            parts = step_parts(runs[key], weights[key] if args.backward else None, args.steps)
            print(f"Gefen's step in parts, {count} tensors, us per tensor: "
                  + ", ".join(f"{name} {seconds / count * 1e6:.3f}" for name, seconds in parts.items()))


def backward(optimizer: torch.optim.Optimizer, weights: list[torch.Tensor]) -> None:
    """New gradients (``weights``, as fresh tensors) for the optimizer's parameters from a
    forward and backward of sum((p * w).sum()), after zero_grad as a training loop does."""
    optimizer.zero_grad()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with torch.enable_grad():
        torch.autograd.backward([(p * w).sum() for p, w in zip(params, weights)])


def kernel_times(optimizers: list[Gefen], steps: int) -> list[float]:
    """Median times of the C step of each optimizer's bucket (its tables filled once),
    interleaved."""
    calls = []
    for optimizer in optimizers:
        (bucket,) = optimizer._buckets
        prepared.fill_tables(bucket)
        calls.append((optimizer._kernel_args(bucket, []), bucket.host_tables()))
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(steps):
        for (args, tables), kept in zip(calls, times):
            start = time.perf_counter()
            cpu_step._run(args, *tables)
            kept.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def step_parts(optimizer: Gefen, weights: list[torch.Tensor] | None,
               steps: int) -> dict[str, float]:
    """Median seconds of each part of the optimizer's steady CPU step (prepared.prepare, run_prepared),
    each step after a backward where ``weights`` are given."""
    (bucket,) = optimizer._buckets
    times: dict[str, list[float]] = {"tables and bump": [], "kernel": [], "state's bump": [],
                                     "release": []}
    for _ in range(steps):
        if weights is not None:
            backward(optimizer, weights)
        start = time.perf_counter()
        status, held = prepared.fill_tables(bucket)
        filled = time.perf_counter()
        cpu_step._run(optimizer._kernel_args(bucket, []), *bucket.host_tables())
        stepped = time.perf_counter()
        torch.autograd.graph.increment_version(bucket.written_state())
        bumped = time.perf_counter()
        del held
        released = time.perf_counter()
        assert status == -1, "every gradient must be one the prepared step takes"
        for name, (begin, end) in zip(times, [(start, filled), (filled, stepped),
                                              (stepped, bumped), (bumped, released)]):
            times[name].append(end - begin)
    return {name: statistics.median(values) for name, values in times.items()}


if __name__ == "__main__":
    main()
