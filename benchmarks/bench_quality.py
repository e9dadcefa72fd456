"""Training quality of Gefen against AdamW: the main example's comparison, recorded.

    python benchmarks/bench_quality.py                 # the example's default settings, seed 0
    python benchmarks/bench_quality.py --seeds 0 1 2   # more seeds; the table adds their mean

Runs ``examples/train_gpt.py``'s comparison (a byte-level GPT on the Python standard library,
AdamW then Gefen, same seed, data, initial weights and hyperparameters) at that script's default
settings, and writes into ``benchmarks/results/``:

- ``quality.md``: date, the exact command, the machine, and per seed the final validation and
  train loss of each optimizer, its ratio to AdamW, its optimizer-state bytes per parameter,
  tokens/s and wall time;
- ``quality_curves.csv``: every run's per-step curve (train_gpt's ``curves.csv`` columns, after
  a ``seed`` column);
- ``quality_loss.png``: the loss curves of the first seed (skipped with ``--no-plot``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import train_gpt  # noqa: E402
from train_gpt import RunResult, TrainConfig  # noqa: E402


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1-minute load average, or "n/a" where the OS does not report it."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "n/a"


def git_commit() -> str:
    """The checkout's commit (with ``+dirty`` when it has local changes), or "unknown"."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()

        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain")
                                                      else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(config: TrainConfig) -> str:
    """One line naming what the figures were measured on."""
    device = config.device
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name()})"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
        f"device {device}; torch {torch.__version__}, Python {platform.python_version()}, "
        f"gefen-compile commit {git_commit()}"
    )


def results_table(runs: dict[int, list[RunResult]]) -> str:
    """Markdown table: one row per (seed, optimizer), then the mean over seeds if several."""
    lines = [
        "| seed | optimizer | class | val loss | val / first | train loss | train / first "
        "| state B/param | tokens/s | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, results in runs.items():
        base = results[0]
        for r in results:
            lines.append(
                f"| {seed} | {r.optimizer} | {r.optimizer_class} | {r.final_val_loss:.4f} "
                f"| {r.final_val_loss / base.final_val_loss:.4f} | {r.final_train_loss:.4f} "
                f"| {r.final_train_loss / base.final_train_loss:.4f} "
                f"| {r.state_bytes_per_param:.3f} | {r.tokens_per_s:,.0f} "
                f"| {r.wall_seconds:.1f} |"
            )
    if len(runs) > 1:
        names = [r.optimizer for r in next(iter(runs.values()))]
        for i, name in enumerate(names):
            val = statistics.mean(rs[i].final_val_loss for rs in runs.values())
            ratio = statistics.mean(rs[i].final_val_loss / rs[0].final_val_loss
                                    for rs in runs.values())
            train = statistics.mean(rs[i].final_train_loss for rs in runs.values())
            lines.append(f"| mean | {name} | | {val:.4f} | {ratio:.4f} | {train:.4f} | | | | |")
    return "\n".join(lines)


def write_markdown(
    runs: dict[int, list[RunResult]],
    config: TrainConfig,
    command: str,
    path: Path,
    load_before: str,
) -> None:
    """``quality.md``: when, how, where (with the load average before and after the runs,
    since timings on a shared machine mean little without it), and the table."""
    load_after = load_average()
    preset = train_gpt.PRESETS[config.size]
    first = next(iter(runs.values()))[0]
    text = f"""# Training quality: Gefen vs AdamW

Written by `benchmarks/bench_quality.py` on {datetime.datetime.now():%Y-%m-%d %H:%M}.

Command: `{command}`

Machine: {machine(config)}; load average (1 min) {load_before} before the runs, {load_after}
after (above the torch threads in use means other processes shared the cores, and the timings
are slower than on an idle machine)

Setting: `examples/train_gpt.py` at its defaults: the `{config.size}` GPT ({preset.n_layer} layers,
{preset.n_head} heads, width {preset.n_embd}, {first.params:,} parameters, tied byte
embedding), context {config.block_size} bytes, {config.steps} steps of {config.batch_size}
sequences, peak lr {config.lr} (linear warm-up, cosine decay), betas {train_gpt.BETAS},
weight decay {train_gpt.WEIGHT_DECAY}, gradient clipping {train_gpt.GRAD_CLIP}. Every
optimizer of a seed starts from the same weights and sees the same batches. Losses in
nats/byte: validation on {train_gpt.FINAL_EVAL_BATCHES} fixed held-out batches after the last
step; train, the mean batch loss of the last {train_gpt.train_loss_window(config.steps)} steps. The
uniform guess scores 5.545 and the corpus's unigram entropy is about 3.1. "State B/param":
bytes of every tensor in the optimizer's state (and its codebook) per model parameter, measured
after the first step. Wall time includes the periodic evaluations.

{results_table(runs)}

Curves: `quality_curves.csv`; plot (first seed): `quality_loss.png`.
"""
    path.write_text(text)


def write_curves(runs: dict[int, list[RunResult]], path: Path) -> None:
    """Every run's curve, with the seed as the first column."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("seed", *train_gpt.CSV_COLUMNS))
        writer.writeheader()
        for seed, results in runs.items():
            for result in results:
                for row in result.curve:
                    writer.writerow(
                        {"seed": seed, **{k: "" if v is None else v for k, v in row.items()}}
                    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--optimizer", nargs="+", choices=train_gpt.OPTIMIZERS,
                        default=["adamw", "gefen"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default, one per core)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/bench_quality.py", *(argv or sys.argv[1:])])

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    data = train_gpt.load_corpus()
    runs: dict[int, list[RunResult]] = {}
    for seed in args.seeds:
        # Through train_gpt's own command line, so these are exactly its default settings.
        config = train_gpt.config_from_args(
            train_gpt.parse_args(["--seed", str(seed), "--device", args.device])
        )
        print(f"seed {seed}", flush=True)
        runs[seed] = train_gpt.compare(args.optimizer, config, data)
        print(train_gpt.format_table(runs[seed]), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(runs, config, command, args.out / "quality.md", load_before)
    write_curves(runs, args.out / "quality_curves.csv")
    written = ["quality.md", "quality_curves.csv"]
    if not args.no_plot:
        first_seed = args.seeds[0]
        train_gpt.plot(runs[first_seed], args.out / "quality_loss.png",
                       title=f"byte-level GPT on the Python standard library, seed {first_seed}")
        written.append("quality_loss.png")
    print(f"\nwrote {', '.join(str(args.out / name) for name in written)}")


if __name__ == "__main__":
    main()
