"""Optimizer step time, state bytes/param and peak extra memory: AdamW (for-loop, foreach, fused)
against Gefen, side by side in one process, on GPT-2-small and Llama-1B parameter shapes; then
torch.optim.Muon against GefenMuon on the hidden matrices (Muon's usual share: attention and MLP
weights, not embeddings).

    python benchmarks/bench_step.py [--model {gpt2,llama1b,all}] [--dtype {float32,bfloat16}]
                                    [--steps N] [--firsts F] [--layers L] [--vocab V]
                                    [--threads T] [--cpu-path {portable,avx2,avx512,vbmi}]

On CPU the models are scaled down by default (fewer layers, a smaller vocabulary: the same
shapes, fewer of them); on CUDA they run at full size. Every optimizer has its own copy of the
parameters; after their first steps, their steps are interleaved, so that the machine's load
changes reach all of them alike. The last line names the processor and which kernels ran
(Gefen's C path, torch's CPU capability), to attribute the figures.

Columns: median step time (first steps excluded) and its ratio to fused AdamW (to Muon, in the
Muon table); the first step
(Gefen: periods, codebook and state; AdamW: state allocation; the median of F, each of a fresh
copy, after the host memory they need was touched once: see warm_memory) and its ratio to one
fused AdamW step; optimizer-state bytes per parameter; the peak memory the optimizer adds over its first
three steps (process RSS high-water mark on CPU, the allocator's peak on CUDA), in bytes per
parameter; and the fraction of the copy bandwidth reached: the bytes its step must move / step
time / bandwidth of a large copy measured in the same process (not for Muon's step, bound by
its Newton-Schulz matrix products).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import time
from collections.abc import Callable

import torch

from gefen_compile import Gefen, GefenMuon
from gefen_compile.kernels import native
from models import MODELS, format_table, structured_grad

CPU_SCALE = {"gpt2": dict(layers=4, vocab=8192), "llama1b": dict(layers=1, vocab=8192)}
OPTIMIZERS: dict[str, Callable] = {
    "AdamW (for-loop)": lambda p: torch.optim.AdamW(p, foreach=False),
    "AdamW (foreach)": lambda p: torch.optim.AdamW(p, foreach=True),
    "AdamW (fused)": lambda p: torch.optim.AdamW(p, fused=True),
    "Gefen": lambda p: Gefen(p),
}
MUON_OPTIMIZERS: dict[str, Callable] = {
    "Muon": lambda p: torch.optim.Muon(p),
    "GefenMuon": lambda p: GefenMuon(p),
}
# Tensors Muon is not given, as usual: embeddings (and the head tied to them).
NOT_FOR_MUON = ("wte", "wpe", "embed")


class PeakMemory:
    """Peak memory above a starting point: CUDA allocator peak, or the process's RSS
    high-water mark (reset through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu":
            # Large blocks straight from mmap and freed memory given back, so that one
            # optimizer's freed state does not hide the next one's allocations from the RSS.
            _LIBC.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
            _LIBC.malloc_trim(0)

    def _current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated()
        return _status_kib("VmRSS") * 1024

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        self.start = self._current()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.start


_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
_M_MMAP_THRESHOLD = -3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [timed(lambda: dst.copy_(src), device) for _ in range(10)]
    return 2 * nbytes / statistics.median(times)


def step_bytes(name: str, dtype: torch.dtype) -> float | None:
    """Bytes per parameter one step must move at the least: AdamW reads p, g, m, v and writes
    p, m, v; Gefen reads p, g and a code and writes p and the code (its per-block values are
    a few bytes per block). None for Muon's steps, bound by their matrix products."""
    size = torch.finfo(dtype).bits // 8
    if "Muon" in name:
        return None
    return 7 * size if name.startswith("AdamW") else 4 * size + 2


def warm_memory(nbytes: int) -> None:
    """Touch and free ``nbytes`` of host memory. On a VM, memory the guest has never touched
    is slow to fault in (the host backs it on first touch): without this, an optimizer's first
    step is slower the more memory the optimizers before it took (Gefen's, on GPT-2 shapes
    after three AdamWs: 10.6x a fused step; first: 6.9x), an order effect, not its own cost."""
    torch.ones(nbytes // 4, dtype=torch.float32)


def fresh(make: Callable, originals: list[torch.Tensor], grads: list[torch.Tensor]):
    """A fresh copy of the parameters (sharing the read-only gradients) and its optimizer."""
    params = [torch.nn.Parameter(o.clone()) for o in originals]
    for p, g in zip(params, grads):
        p.grad = g
    return make(params)


def prepare(make: Callable, originals: list[torch.Tensor], grads: list[torch.Tensor],
            firsts: int) -> dict:
    """An optimizer on a fresh copy of the parameters after its first steps: the median time of
    ``firsts`` first steps (each of a fresh copy: one is noise on a shared machine), the
    state's bytes and the peak memory its first steps added."""
    device = originals[0].device
    times = [timed(fresh(make, originals, grads).step, device) for _ in range(firsts - 1)]
    optimizer = fresh(make, originals, grads)
    with PeakMemory(device) as peak:
        times.append(timed(optimizer.step, device))
        for _ in range(2):
            optimizer.step()
    state = sum(
        t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    return dict(optimizer=optimizer, first=statistics.median(times), state=state,
                peak=peak.peak, times=[])


@torch.no_grad()
def bench(title: str, kinds, dtype: torch.dtype, device: torch.device, steps: int,
          optimizers: dict[str, Callable] = OPTIMIZERS, reference: str = "AdamW (fused)", *,
          firsts: int = 3) -> str:
    """The table of ``optimizers`` on parameters of ``kinds``, ratios to ``reference``."""
    originals, grads = [], []
    for kind in kinds:
        for _ in range(kind.count):
            originals.append(torch.randn(kind.shape, dtype=dtype, device=device))
            grads.append(structured_grad(kind.shape, dtype).to(device))
    numel = sum(p.numel() for p in originals)
    torch.optim.AdamW([torch.nn.Parameter(originals[0])])  # imports torch._dynamo: not a step
    if device.type == "cpu":  # what every optimizer's copy, state and first step may hold
        warm_memory(numel * dtype.itemsize * 12 * len(optimizers))
    results = {name: prepare(make, originals, grads, firsts) for name, make in optimizers.items()}
    # Steps interleaved, so that a change in the machine's load reaches every optimizer alike.
    for _ in range(steps):
        for r in results.values():
            r["times"].append(timed(r["optimizer"].step, device))
    fused = statistics.median(results[reference]["times"])
    bandwidth = copy_bandwidth(device)
    versus = "fused" if reference == "AdamW (fused)" else reference
    header = ("optimizer", "step ms", f"vs {versus}", "first step ms", f"vs {versus} step",
              "state B/param", "peak extra B/param", "of copy bandwidth")
    rows = []
    for name, r in results.items():
        median = statistics.median(r["times"])
        moved = step_bytes(name, dtype)
        rows.append((
            name,
            f"{median * 1e3:.2f}",
            f"{median / fused:.2f}x",
            f"{r['first'] * 1e3:.1f}",
            f"{r['first'] / fused:.1f}x",
            f"{r['state'] / numel:.3f}",
            f"{r['peak'] / numel:.2f}",
            "-" if moved is None else f"{moved * numel / median / bandwidth:.0%}",
        ))
    return "\n".join([
        f"{title}: {numel / 1e6:.1f}M {str(dtype).removeprefix('torch.')} parameters in "
        f"{len(originals)} tensors, {device}, {torch.get_num_threads()} threads, "
        f"median of {steps} interleaved steps",
        "",
        format_table(header, rows, left=1),
        f"(copy bandwidth {bandwidth / 1e9:.1f} GB/s: bytes read and written by a 1 GB copy"
        + ("; a step's bytes: AdamW 7, Gefen 4 per parameter element size, plus 2 code bytes)"
           if any(step_bytes(name, dtype) is not None for name in results) else ")"),
    ])


def machine(device: torch.device) -> str:
    """What the figures depend on: the processor or GPU, and which kernels ran."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}; Gefen's step: Triton"
    return (f"Gefen's step: {native.describe()}; torch's CPU kernels: "
            f"{torch.backends.cpu.get_cpu_capability()} (ATEN_CPU_CAPABILITY picks another)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--firsts", type=int, default=3,
                        help="first steps timed, each of a fresh copy (their median is shown)")
    parser.add_argument("--layers", type=int, help="default: full size on CUDA, fewer on CPU")
    parser.add_argument("--vocab", type=int, help="default: full size on CUDA, smaller on CPU")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--cpu-path", choices=native.CPU_PATHS,
                        help="Gefen's C step path (default: the fastest the CPU runs); to "
                        "measure an AVX2-only CPU on an AVX-512 one, --cpu-path avx2 with "
                        "ATEN_CPU_CAPABILITY=avx2 for torch's AdamW")
    parser.add_argument("--no-muon", action="store_true",
                        help="leave out the Muon table (its steps take seconds each on a CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_path:
        native.use_cpu_path(args.cpu_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    for i, name in enumerate(MODELS if args.model == "all" else [args.model]):
        title, build = MODELS[name]
        size = {} if device.type == "cuda" else dict(CPU_SCALE[name])
        size.update({k: v for k, v in (("layers", args.layers), ("vocab", args.vocab)) if v})
        if size:
            title += " shapes, " + ", ".join(f"{k} {v}" for k, v in size.items())
        kinds = build(**size)
        print(("\n" if i else "") + bench(title, kinds, dtype, device, args.steps,
                                            firsts=args.firsts))
        if args.no_muon:
            continue
        matrices = [k for k in kinds
                    if len(k.shape) == 2 and not any(w in k.name for w in NOT_FOR_MUON)]
        print("\n" + bench(f"{title}, hidden matrices (Muon's share)", matrices, dtype, device,
                           args.steps, MUON_OPTIMIZERS, "Muon", firsts=args.firsts))
    print(f"\n{machine(device)}")


if __name__ == "__main__":
    main()
