"""Benchmarks that reach into the package's internals, run as a user runs them (smallest
configuration): a renamed internal breaks them without any other test noticing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_bench_host_times_every_path_it_names():
    """benchmarks/bench_host.py swaps the prepared step's runner and the general path's kernel:
    each row it prints is a real per-tensor time, and it puts back what it swapped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c",
         "import runpy, sys; sys.argv = ['bench_host', '--tensors', '40', '--repeats', '1'];"
         "runpy.run_path('benchmarks/bench_host.py', run_name='__main__');"
         "from gefen_compile import ops;"
         "from gefen_compile.kernels import cpu_step, prepared, triton_step;"
         "assert prepared.RUNNERS['cpu'] is cpu_step._run, 'runner not restored';"
         "assert prepared.prepare.__module__ == 'gefen_compile.kernels.prepared';"
         "assert ops._STEP_KERNELS['cpu'] is cpu_step.step;"
         "assert triton_step._launch.__module__ == 'gefen_compile.kernels.triton_step'"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if "us per tensor" in line]
    names = ["CPU path", "CUDA launcher, prepared tables", "CUDA launcher, general path"]
    assert [row.split(" (")[0] for row in rows] == names
    assert all(float(row.split(": ")[1].split()[0]) > 0 for row in rows)


def test_bench_kernel_ab_compares_a_build_or_a_path_with_this_checkout():
    """benchmarks/bench_kernel_ab.py steps one parameter's state with two libraries (here the
    checkout's own library file as the baseline build), or with two paths of this checkout's
    library (--baseline-path), alternately, and prints each shape's medians and ratio."""
    from gefen_compile.kernels import native

    if native.library is None:
        pytest.skip("needs the C kernels")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for baseline in ([native.library._name], ["--baseline-path", "portable"]):
        proc = subprocess.run(
            [sys.executable, "benchmarks/bench_kernel_ab.py", *baseline, "--path", "portable",
             "--shapes", "64x64", "40x9", "--steps", "3", "--dtype", "bfloat16"],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [line for line in proc.stdout.splitlines() if "ratio" in line]
        assert [row.split(":")[0] for row in rows] == ["64x64", "40x9"]
        assert all(float(row.rsplit(" ", 1)[1]) > 0 for row in rows)
