"""The main example, ``examples/train_gpt.py``, at its ``tiny`` preset: it runs from the command
line as the README shows, writes the curves and the report it documents, and both optimizers
learn.

One subprocess run (AdamW, Gefen, then the runner's child process) is shared by the tests below;
a few seconds on 2 cores.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_gpt.py"
STEPS = 40
COLUMNS = ["optimizer", "step", "train_loss", "val_loss", "tokens_per_s", "state_bytes_per_param"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``train_gpt.py --size tiny`` with AdamW, Gefen and the runner: its exit status, output,
    CSV rows and JSON report."""
    tmp = tmp_path_factory.mktemp("train_gpt")
    out, report = tmp / "out", tmp / "report.json"
    # The checkout's package first, whatever gefen_compile is installed; one thread, as these
    # ops are small and a second thread on a busy runner only waits.
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    command = [
        sys.executable, str(SCRIPT), "--size", "tiny", "--steps", str(STEPS), "--threads", "1",
        "--device", "cpu", "--optimizer", "adamw", "gefen", "runner", "--out", str(out),
        "--report", str(report), "--no-plot",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    rows = []
    if (out / "curves.csv").exists():
        with (out / "curves.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
    return {
        "proc": proc,
        "out": out,
        "rows": rows,
        "report": json.loads(report.read_text()) if report.exists() else None,
    }


def runs_by_name(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["optimizer"]: r for r in run["report"]["runs"]}


def test_exits_cleanly_and_prints_the_comparison(run: dict[str, Any]) -> None:
    proc = run["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val loss" in proc.stdout
    assert "adamw" in proc.stdout and "gefen" in proc.stdout
    # --no-plot: no PNG, so the run needs no matplotlib.
    assert not (run["out"] / "loss.png").exists()


def test_csv_has_a_row_per_step_for_both_optimizers(run: dict[str, Any]) -> None:
    rows = run["rows"]
    assert rows, run["proc"].stderr[-3000:]
    assert list(rows[0]) == COLUMNS
    for name in ("adamw", "gefen"):
        steps = [int(r["step"]) for r in rows if r["optimizer"] == name]
        # Step 0 is the validation loss before training.
        assert steps == list(range(STEPS + 1)), name
        evaluated = [r for r in rows if r["optimizer"] == name and r["val_loss"]]
        assert int(evaluated[0]["step"]) == 0 and int(evaluated[-1]["step"]) == STEPS
        assert len(evaluated) > 2  # periodic evaluations in between
        for r in rows:
            if r["optimizer"] == name and int(r["step"]) > 0:
                assert math.isfinite(float(r["train_loss"]))
                assert float(r["tokens_per_s"]) > 0


def test_report_state_bytes_per_param(run: dict[str, Any]) -> None:
    runs = runs_by_name(run)
    assert runs["adamw"]["optimizer_class"] == "AdamW"
    assert runs["gefen"]["optimizer_class"] == "Gefen"
    # AdamW: exp_avg and exp_avg_sq in fp32 (plus a 4-byte step counter per tensor).
    assert runs["adamw"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    assert runs["gefen"]["state_bytes_per_param"] <= 1.1
    assert runs["adamw"]["params"] == runs["gefen"]["params"] > 0
    for r in runs.values():
        assert r["steps"] == STEPS
        assert r["tokens_per_s"] > 0 and r["wall_seconds"] > 0


def test_loss_decreases(run: dict[str, Any]) -> None:
    runs = runs_by_name(run)
    for name in ("adamw", "gefen"):
        val = [float(r["val_loss"]) for r in run["rows"]
               if r["optimizer"] == name and r["val_loss"]]
        # From about log(256) = 5.5 nats/byte; the unigram entropy of the corpus is about 3.1.
        assert val[0] > 5.0, (name, val)
        assert val[-1] < val[0] - 1.5, (name, val)
        assert runs[name]["final_val_loss"] == pytest.approx(val[-1])
        assert runs[name]["final_train_loss"] < val[0] - 1.5
    # Same seed, data, initial weights and hyperparameters: the two runs start identically.
    first = {r["optimizer"]: float(r["val_loss"]) for r in run["rows"] if r["step"] == "0"}
    assert first["adamw"] == first["gefen"]


def test_runner_converts_the_unmodified_scripts_adamw(run: dict[str, Any]) -> None:
    """``--optimizer runner``: the script's own ``torch.optim.AdamW`` path, run by
    ``python -m gefen_compile`` in a child process, trains exactly as Gefen does here."""
    runs = runs_by_name(run)
    assert runs["runner"]["optimizer_class"] == "GefenAdamW"
    assert runs["runner"]["state_bytes_per_param"] == runs["gefen"]["state_bytes_per_param"]
    assert runs["runner"]["final_val_loss"] == runs["gefen"]["final_val_loss"]

    def losses(name: str) -> list[tuple[str, str, str]]:
        return [(r["step"], r["train_loss"], r["val_loss"]) for r in run["rows"]
                if r["optimizer"] == name]

    assert len(losses("runner")) == STEPS + 1
    assert losses("runner") == losses("gefen")
    assert losses("runner") != losses("adamw")


def test_help_documents_every_option_without_a_none_default() -> None:
    """``--help`` names each option's meaning; options whose default comes from the preset say
    so rather than "(default: None)"."""
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                            text=True, check=True)
    text = " ".join(result.stdout.split())
    assert "(default: None)" not in text
    assert text.count("(default: preset's)") == 4
    assert "--device DEVICE torch device" in text
