"""Command line of the quality suite: ``python -m benchmarks.quality --help`` (from the repository
root). Runs every chosen workload x seed x optimizer, rewriting the outputs after each workload
so that an interrupted run still leaves what it finished.

Parallelism is across runs, not inside them: ``--jobs`` processes (default one per core) of
``--threads 1`` each. On a 2-core machine that is about twice one thread's throughput, more than
two intra-op threads give these small models, and it degrades gracefully when other processes
share the cores, where two OpenMP threads per run were measured 5x slower than one (each
waits at every barrier for a thread that is not scheduled). Results do not depend on it: each
run draws everything from its seed.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import torch

from . import data, report
from .optimizers import OPTIMIZERS
from .workloads import WORKLOADS, Run, Workload, run_task

ROOT = Path(__file__).resolve().parents[2]
# The Muon workload only when asked for: the default suite stays what its ~30 min budget and
# its summary.md were made for.
DEFAULT_WORKLOADS = [name for name in WORKLOADS if name != "gpt2-bpe-muon"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality",
        description="AdamW vs Gefen (robust, published) on five workloads, several seeds; "
                    "Muon vs GefenMuon on a sixth (--workloads gpt2-bpe-muon).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                        default=DEFAULT_WORKLOADS)
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS),
                        help="a subset, for a look at one; each workload runs those of its "
                             "contestants, and its reference (adamw; muon for gpt2-bpe-muon), "
                             "which the report compares to")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and few steps: a smoke test of the whole suite")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="runs at a time, each in its own process (1: in this process)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per run; parallelism is across runs (--jobs): "
                             "two OpenMP threads per run were 5x slower than one on a machine "
                             "shared with other work")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNGs (no matplotlib)")
    return parser.parse_args(argv)


def cpu_name() -> str:
    """The CPU's marketing name (Linux's /proc/cpuinfo), else whatever platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.partition(":")[2].strip() for line in f if line.startswith("model name")]
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def commit() -> str:
    """The checkout's short commit, ``+dirty`` with uncommitted changes (read-only git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        dirty = "+dirty" if git("status", "--porcelain") else ""
        return git("rev-parse", "--short", "HEAD") + dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(args: argparse.Namespace, command: str, load_before: str,
           started: datetime.datetime, total: float) -> str:
    kind = (" (--quick: tiny sizes, a smoke test; its numbers say nothing about quality)"
            if args.quick else "")
    contests = "; ".join(dict.fromkeys(WORKLOADS[name].contest for name in args.workloads))
    return f"""# Training quality: {contests}{kind}

Written by `benchmarks/quality` on {started:%Y-%m-%d %H:%M}; seeds \
{', '.join(map(str, args.seeds))}.

Command: `{command}`

Machine: {cpu_name()}, {os.cpu_count()} cores; {args.jobs} run(s) at a time, {args.threads} \
torch thread(s) each; torch {torch.__version__}, Python {platform.python_version()}, \
gefen-compile commit {commit()}.

Total wall time {total / 60:.1f} min; load average (1 min) {load_before} before, {load()} after \
(above {args.jobs * args.threads}: other processes shared the cores and the times are \
inflated)."""


def submit_all(args: argparse.Namespace, chosen: list[Workload]) -> dict[str, list[Future]]:
    """Every (workload, seed, optimizer) run, queued in that order on ``args.jobs`` worker
    processes (spawned: no forked OpenMP state), or run one by one here with ``--jobs 1``.
    A workload runs the chosen ones of its contestants, and always its reference."""
    tasks = {w.name: [(w.name, o, s, args.quick, args.threads) for s in args.seeds
                      for o in w.optimizers if o in args.optimizers or o == w.reference]
             for w in chosen}
    if args.jobs == 1:
        torch.set_num_threads(args.threads)
        return {name: [_Done(run_task, t) for t in ts] for name, ts in tasks.items()}
    pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
    return {name: [pool.submit(run_task, *t) for t in ts] for name, ts in tasks.items()}


class _Done:
    """A run done on demand in this process, behind the ``Future.result()`` interface."""

    def __init__(self, fn, args) -> None:
        self.fn, self.args = fn, args

    def result(self) -> list[Run]:
        return self.fn(*self.args)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.quality",
                          *(sys.argv[1:] if argv is None else argv)])
    started, load_before, tic = datetime.datetime.now(), load(), time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = [WORKLOADS[name] for name in args.workloads]
    runs: list[Run] = []
    seconds: dict[str, float] = {}
    descriptions: dict[str, str] = {}
    if any("-bpe" in w.name for w in chosen):
        data.bpe_tokens()  # trained and cached once here, before the workers race to do it
    futures = submit_all(args, chosen)
    for workload in chosen:
        new_runs: list[Run] = []
        for future in futures[workload.name]:
            new = future.result()
            new_runs += new
            finals = ", ".join("crashed" if r.error else f"{r.final_loss:.4f}" for r in new)
            print(f"{workload.name:>10} seed {new[0].seed} {new[0].optimizer:<15} {finals}  "
                  f"({sum(r.seconds for r in new):.1f} s, "
                  f"{sum(r.cpu_seconds for r in new):.1f} CPU s)", flush=True)
        runs += new_runs
        # Summed over runs: with several jobs, a workload's runs overlap each other and the
        # next workload's, so its own wall-clock span would mean little.
        seconds[workload.name] = sum(r.seconds for r in new_runs)
        descriptions[workload.name] = workload.describe(args.quick)
        done = [w for w in chosen if w.name in seconds]
        report.write_curves(runs, args.out / "curves.csv")
        report.write_summary(
            args.out / "summary.md",
            header(args, command, load_before, started, time.perf_counter() - tic),
            done, runs, descriptions, seconds)
        if not args.no_plot:
            report.plot_workload(workload, runs, args.out / f"{workload.name}.png")
    print()
    print(report.summary_table(chosen, runs))
    print(f"\nwrote {args.out}/summary.md, curves.csv"
          + ("" if args.no_plot else ", " + ", ".join(f"{w.name}.png" for w in chosen)))


if __name__ == "__main__":
    main()
