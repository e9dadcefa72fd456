"""PyTorch's own generic optimizer checks for AdamW, run against Gefen: every error input of
the AdamW ``OptimizerInfo`` (torch.testing._internal.common_optimizers) raises the same error
type with torch's wording first, and every valid input constructs and steps. The one Gefen
exception: amsgrad=True is refused (NotImplementedError naming it).

torch's inputs are run in a child process (tests/torch_optim_db.py): importing torch's internal
test modules changes global state. Skipped, with the reason, where that module is missing
(it needs the ``expecttest`` package, in the ``test`` extra)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def torch_cases() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "torch_optim_db.py")],
                         capture_output=True, text=True, env=env, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    cases = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in cases:
        pytest.skip(cases["skip"])
    return cases


def test_every_adamw_error_input_raises_torchs_error_with_its_wording_first(torch_cases):
    errors = torch_cases["errors"]
    assert errors, f"torch {torch_cases['torch']} listed no AdamW error inputs"
    failures = []
    for case in errors:
        regex, expected = case["regex"], case["expected"]
        if expected.endswith("Warning"):
            texts = [m for category, m in case.get("warnings", []) if category == expected]
        elif case["raised"] and expected in case["raised"]:
            texts = [case["message"]]
        else:
            texts = []
        # re.match: torch's wording first (Gefen's advice may follow).
        if not any(re.match(regex, text) for text in texts):
            failures.append(f"{case['desc']}: expected {expected} matching {regex!r}, got "
                            f"{case.get('raised') and case['raised'][0]}: "
                            f"{case.get('message', case.get('warnings'))}")
    assert not failures, "\n".join(failures)


def test_every_valid_adamw_input_steps_except_amsgrad_which_is_refused(torch_cases):
    valid = torch_cases["valid"]
    assert [c for c in valid if not c["amsgrad"]], "torch listed no valid non-amsgrad input"
    for case in valid:
        if case["amsgrad"]:
            assert case["raised"] and case["raised"][0] == "NotImplementedError", case
            assert "amsgrad=True" in case["message"] and "AdamW" in case["message"], case
        else:
            assert case["raised"] is None, case
            assert case["changed"] and case["finite"], case
