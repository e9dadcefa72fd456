"""Benchmarks that reach into the package's internals, run as a user runs them (smallest
configuration): a renamed internal breaks them without any other test noticing."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_embedding_periods_installs_its_rule_where_the_optimizer_reads_periods():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "benchmarks/embedding_periods.py", "one", "--rule", "rows", "--steps", "2"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # train_gpt's tied 256x256 byte embedding: inferred at 2048, one row under the rule
    assert result["changed"] == [[[256, 256], 2048, 256]]
