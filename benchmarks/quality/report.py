"""The suite's files: ``summary.md``, ``curves.csv`` and one ``<workload>.png`` per workload.

The gaps worth seeing are 1-3% of the loss, which a plain loss plot hides behind the first
steps' fall; so each plot clips its loss axis to the last 70% of training and shows, beside it,
each Gefen variant's loss divided by AdamW's (smoothed, per seed, then averaged over seeds), or
for a workload with another reference (Muon's), each contestant's divided by the reference's.
"""

from __future__ import annotations

import csv
import math
import statistics
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from .optimizers import OPTIMIZERS
from .workloads import Run, Workload

# How the tables and plots name a workload's reference optimizer.
REFERENCE_NAMES = {"adamw": "AdamW", "muon": "Muon"}

CSV_COLUMNS = ("workload", "optimizer", "seed", "config", "step", "train_loss", "val_loss")
# Losses are plotted (and their axis limits taken) over the last this-fraction of training.
PLOT_TAIL = 0.7


def write_curves(runs: list[Run], path: Path) -> None:
    """One row per (run, step); empty cells where a loss was not measured."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for run in runs:
            for step, train, val in run.curve:
                writer.writerow([run.workload, run.optimizer, run.seed, run.config, step,
                                 "" if train is None else repr(train),
                                 "" if val is None else repr(val)])


# ---------------------------------------------------------------------------------------------
# Numbers


def _key(run: Run) -> tuple[int, str]:
    """What pairs a run with the reference's: the same seed (and family member)."""
    return run.seed, run.config


def _scored(run: Run) -> bool:
    """Whether the run's final loss enters means and ratios: it finished and did not diverge
    (the table counts the others; one diverged loss of 1e5 would drown every other number)."""
    return not run.error and not run.diverged and _positive(run.final_loss)


def paired_ratio(runs: list[Run], optimizer: str,
                 reference: str = "adamw") -> tuple[float, int]:
    """Geometric mean over pairs of ``final_loss(optimizer) / final_loss(reference)``, over the
    pairs where both are :func:`_scored`, and the number of such pairs."""
    base = {_key(r): r for r in runs if r.optimizer == reference and _scored(r)}
    logs = [
        math.log(r.final_loss / base[_key(r)].final_loss)
        for r in runs
        if r.optimizer == optimizer and _key(r) in base and _scored(r)
    ]
    return (math.exp(statistics.fmean(logs)) if logs else math.nan), len(logs)


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def _mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {spread:.4f}"


def _versus(workloads: list[Workload]) -> str:
    """The ratio column's reference: its name where every workload has the same one."""
    references = {w.reference for w in workloads}
    return REFERENCE_NAMES[references.pop()] if len(references) == 1 else "reference"


def summary_table(workloads: list[Workload], runs: list[Run]) -> str:
    """Per workload and optimizer: final loss mean ± sample std over seeds (over the family's
    members for the MLPs), the paired ratio to the workload's reference (AdamW, or Muon),
    diverged and crashed runs, state bytes per parameter and the mean wall time per run."""
    lines = [
        f"| workload | optimizer | runs | final loss, mean ± std | vs {_versus(workloads)} "
        "| diverged | crashed "
        "| state B/param | s/run | CPU s/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for workload in workloads:
        mine = [r for r in runs if r.workload == workload.name]
        for optimizer in workload.optimizers:
            these = [r for r in mine if r.optimizer == optimizer]
            if not these:
                continue
            ratio, pairs = paired_ratio(mine, optimizer, workload.reference)
            ratio_text = "n/a" if math.isnan(ratio) else f"{100 * ratio:.2f}%"
            if pairs < len(these) and pairs:
                ratio_text += f" ({pairs} pairs)"
            states = [r.state_bytes_per_param for r in these
                      if math.isfinite(r.state_bytes_per_param)]
            state = f"{statistics.fmean(states):.3f}" if states else "n/a"
            if len(states) > 1 and max(states) - min(states) > 5e-4:
                state += f" ({min(states):.3f}-{max(states):.3f})"
            lines.append(
                f"| {workload.name} | {optimizer} | {len(these)} "
                f"| {_mean_std([r.final_loss for r in these if _scored(r)])} | {ratio_text} "
                f"| {sum(r.diverged for r in these)} | {sum(bool(r.error) for r in these)} "
                f"| {state} | {statistics.fmean(r.seconds for r in these):.1f} "
                f"| {statistics.fmean(r.cpu_seconds for r in these):.1f} |"
            )
    return "\n".join(lines)


def family_table(runs: list[Run]) -> str:
    """Every member of a family (the MLPs): its final loss under each optimizer, with
    ``diverged`` marked."""
    by_member: dict[tuple[int, str], dict[str, Run]] = defaultdict(dict)
    for run in runs:
        by_member[_key(run)][run.optimizer] = run
    present = [o for o in OPTIMIZERS if any(o in m for m in by_member.values())]
    lines = ["| seed | config | initial | " + " | ".join(present) + " |",
             "|---|---|---|" + "---|" * len(present)]

    def cell(run: Run | None) -> str:
        if run is None:
            return ""
        if run.error:
            return "crashed"
        return f"{run.final_loss:.4g}" + (" **diverged**" if run.diverged else "")

    for (seed, config), member in by_member.items():  # the order the runs were made in
        initial = next(iter(member.values())).initial_loss
        lines.append(f"| {seed} | {config} | {initial:.4g} | "
                     + " | ".join(cell(member.get(o)) for o in present) + " |")
    return "\n".join(lines)


def errors_list(runs: list[Run]) -> str:
    crashed = [r for r in runs if r.error]
    return "\n".join(f"- {r.workload} {r.optimizer} seed {r.seed} {r.config}: `{r.error}`"
                     for r in crashed)


# ---------------------------------------------------------------------------------------------
# Plots


def _series(run: Run, column: int, steps: int) -> np.ndarray:
    """Column 1 (train) or 2 (val) of ``run.curve`` as an array over steps 0..steps, NaN where
    not measured (or after the run stopped)."""
    out = np.full(steps + 1, np.nan)
    for row in run.curve:
        if row[column] is not None and row[0] <= steps:
            out[row[0]] = row[column]
    return out


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` measured values (NaNs skipped), so a batch's noise does not
    read as a gap; NaN wherever the window holds nothing."""
    if window <= 1:
        return values
    ok = np.isfinite(values)
    total = np.convolve(np.where(ok, values, 0.0), np.ones(window))[: len(values)]
    count = np.convolve(ok.astype(float), np.ones(window))[: len(values)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def _nanmean(rows: list[np.ndarray], geometric: bool) -> np.ndarray:
    """Mean over runs, step by step, of the finite values (geometric: of their logs)."""
    stack = np.vstack(rows)
    keep = np.isfinite(stack) & (stack > 0) if geometric else np.isfinite(stack)
    stack = np.where(keep, stack, np.nan)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice": NaN is right
        return np.exp(np.nanmean(np.log(stack), 0)) if geometric else np.nanmean(stack, 0)


def _tail_limits(curves: list[np.ndarray], start: int,
                 log: bool = False) -> tuple[float, float] | None:
    """Axis limits fitting the finite values of ``curves`` from step ``start`` on, with a 5%
    margin (of the log range on a log axis)."""
    if not curves:
        return None
    values = np.concatenate([c[start:] for c in curves])
    values = values[np.isfinite(values) & (values > 0)] if log else values[np.isfinite(values)]
    if not len(values):
        return None
    low, high = float(values.min()), float(values.max())
    if log:
        pad = 0.05 * (math.log(high) - math.log(low)) or 0.01
        return low * math.exp(-pad), high * math.exp(pad)
    pad = 0.05 * (high - low) or 0.01 * abs(high) or 0.01
    return low - pad, high + pad


def plot_workload(workload: Workload, runs: list[Run], path: Path) -> None:
    """Left: each optimizer's loss curves (``workload.plotted``: the train loss, smoothed
    where mini-batch noise would hide a gap, as a line; validation as markers), mean over
    seeds, last 70% of steps in view. Right: each Gefen variant's loss over AdamW's (each
    contestant's over the workload's reference), per seed then geometric mean. Crashed and
    diverged runs are left out (the legend counts them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in runs if r.workload == workload.name and r.curve]
    # Seeds (family members) where some optimizer crashed or diverged are left out for all
    # three, so every curve averages the same problems.
    bad = {_key(r) for r in mine if r.error or r.diverged}
    kept = [r for r in mine if _key(r) not in bad]
    if not kept:
        return
    steps = max(r.curve[-1][0] for r in kept)
    window = max(1, steps // 25) if workload.smooth and "train" in workload.plotted else 1
    start = int(steps * (1 - PLOT_TAIL))
    x = np.arange(steps + 1)
    base = {_key(r): r for r in kept if r.optimizer == workload.reference}
    reference = REFERENCE_NAMES[workload.reference]
    geometric = workload.log_scale
    smoothed = " (smoothed)" if window > 1 else ""

    def curves(run: Run) -> dict[str, np.ndarray]:
        out = {}
        if "train" in workload.plotted:
            out["train" + smoothed] = _smooth(_series(run, 1, steps), window)
        if "val" in workload.plotted:
            out["val"] = _series(run, 2, steps)
        return out

    def draw(ax, name: str, y: np.ndarray, i: int, label: str) -> None:
        # The two variants (Muon and GefenMuon) often coincide: the first drawn wider, the
        # second on top of it, keeps both visible.
        width = (1.2, 2.4, 1.0)[i]
        if name == "val":  # sparse: markers joined by a dashed line
            ok = np.isfinite(y)
            ax.plot(x[ok], y[ok], color=f"C{i}", marker="o", linestyle="--", linewidth=width,
                    markersize=(4, 6, 3)[i], label=label)
        else:
            ax.plot(x, y, color=f"C{i}", linewidth=width, label=label)

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    shown, ratios = [], []
    for i, optimizer in enumerate(workload.optimizers):
        these = [r for r in kept if r.optimizer == optimizer]
        failed = sum(r.optimizer == optimizer and (bool(r.error) or r.diverged) for r in mine)
        if not these:
            continue
        tag = optimizer + (f" ({failed} crashed/diverged)" if failed else "")
        per_run = [curves(r) for r in these]
        for name in per_run[0]:
            mean = _nanmean([c[name] for c in per_run], geometric)
            draw(left, name, mean, i, f"{tag}: {name}")
            shown.append(mean)
        paired = [(c, curves(base[_key(r)])) for r, c in zip(these, per_run) if _key(r) in base]
        if optimizer == workload.reference or not paired:
            continue
        for name in per_run[0]:
            ratio = 100 * _nanmean([c[name] / b[name] for c, b in paired], True)
            draw(right, name, ratio, i, f"{optimizer}: {name}")
            ratios.append(ratio)

    if geometric:
        left.set_yscale("log")
    limits = _tail_limits(shown, start, geometric)
    if limits:
        left.set_ylim(*limits)
    left.set_xlim(start, steps)
    left.set_xlabel("step")
    left.set_ylabel(f"{workload.loss_name}, {'geometric ' if geometric else ''}mean over runs")
    left.set_title(f"loss, last {PLOT_TAIL:.0%} of training")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)

    right.axhline(100, color=f"C{workload.optimizers.index(workload.reference)}", linewidth=1,
                  label=reference)
    for band in (1, 2):
        right.axhline(100 + band, color="grey", linewidth=0.6, linestyle=":")
    ratio_limits = _tail_limits(ratios, start)
    if ratio_limits:
        right.set_ylim(min(ratio_limits[0], 99), max(ratio_limits[1], 103))
    right.set_xlim(start, steps)
    right.set_xlabel("step")
    right.set_ylabel(f"% of {reference}'s loss, same seed (geometric mean)")
    others = "Gefen" if workload.reference == "adamw" else "each"
    right.set_title(f"{others} / {reference}" + (f", train smoothed over {window} steps"
                                                  if window > 1 else "") + "; dotted: +1%, +2%")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    seeds = sorted({r.seed for r in mine})
    left_out = (f"; {len(bad)} of {len({_key(r) for r in mine})} runs per optimizer left out, "
                "where one crashed or diverged" if bad else "")
    fig.suptitle(f"{workload.title}: seeds {', '.join(map(str, seeds))}{left_out}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# summary.md


def write_summary(path: Path, header: str, workloads: list[Workload], runs: list[Run],
                  descriptions: dict[str, str], seconds: dict[str, float]) -> None:
    """``summary.md``: ``header`` (when, how, where), the results table, what each workload is
    and how long it took, every MLP's final loss, and any crash."""
    setup = "\n".join(
        f"- **{w.name}** ({seconds.get(w.name, math.nan) / 60:.1f} min of runs, "
        f"{_params(runs, w.name)} parameters): {descriptions[w.name]}"
        for w in workloads
    )
    versus = _versus(workloads)
    whose = f"{versus}'s" if versus != "reference" else "the reference's (AdamW's; " + ", ".join(
        f"{REFERENCE_NAMES[w.reference]}'s for {w.name}" for w in workloads
        if w.reference != "adamw") + ")"
    text = f"""{header}

## Results

Final loss: mean ± sample standard deviation over seeds (over the whole family for `mlp`).
"vs {versus}": geometric mean over seeds (family members) of the paired ratio final loss /
{whose} final loss, the same seed's weights and batches; 100% is parity, above is worse; "(n
pairs)" where fewer pairs than runs entered it. Both leave out crashed and diverged runs (and
the ratio, their pairs), which the next two columns count. Diverged: final loss non-finite or
above 10x the initial. State: optimizer-state
bytes per parameter after the first step (Gefen: `gefen_compile.memory_report`; AdamW: 8).
s/run: wall seconds per run, its evaluations included; CPU s/run: the process's CPU seconds,
which on a machine shared with other work is the better guess of an idle machine's wall time
(one thread per run).

{summary_table(workloads, runs)}

## Workloads

{setup}

Every optimizer gets the same hyperparameters (`torch.optim.AdamW`'s arguments) in a workload.
Curves: `curves.csv` (one row per run and step; `val_loss` empty where not evaluated). Plots:
`<workload>.png`.
"""
    family = [r for r in runs if r.config]
    if family:
        text += f"\n## Every MLP: final loss\n\n{family_table(family)}\n"
    if any(r.error for r in runs):
        text += f"\n## Crashed runs\n\n{errors_list(runs)}\n"
    path.write_text(text)


def _params(runs: list[Run], workload: str) -> str:
    counts = sorted({r.params for r in runs if r.workload == workload and r.params})
    if not counts:
        return "?"
    return f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}-{counts[-1]:,}"
