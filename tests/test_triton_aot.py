"""The CUDA kernels compiled ahead of time for real GPUs (sm_80, sm_90), without a GPU: every
specialisation the launchers produce for a realistic mixed bucket (Gefen's step) and a set of
GefenMuon matrices (its momentum step, Nesterov or not), in fp32, bf16 and fp16, with no spills
and 128-bit memory accesses where the data is aligned. The interpreter (the other kernel tests)
accepts code that no GPU compiler does; this catches it.

Runs the Triton installed here; `python -m gefen_compile.kernels.aot` checks another version
(README, "Development")."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "gefen_compile.kernels.aot", "--arch", "80", "90", "--json",
         str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())["kernels"]


def test_every_specialisation_compiles_for_sm80_and_sm90(compiled, record_property):
    for kernel in ("step", "momentum"):
        seen = {(k["arch"], k["dtype"]) for k in compiled if k["kernel"] == kernel}
        assert seen == {(a, d) for a in (80, 90) for d in ("fp32", "bf16", "fp16")}, kernel
    step = [k["constexprs"] for k in compiled if k["kernel"] == "step"]
    # Short rows, per-element second moments, column chunks, aligned and not: all covered.
    for key in ("PER_ELEMENT", "MULTI", "ALIGNED"):
        assert {c[key] for c in step} == {False, True}, key
    momentum = [k["constexprs"] for k in compiled if k["kernel"] == "momentum"]
    # Many rows to a tile, one row, column chunks; Nesterov or not; aligned and not.
    assert {c["COLS"] for c in momentum} == {64, 256, 1024}
    for key in ("MULTI", "NESTEROV", "ALIGNED"):
        assert {c[key] for c in momentum} == {False, True}, key
    for k in compiled:
        record_property(f"{k['kernel']} sm_{k['arch']} {k['dtype']} {k['constexprs']}",
                        f"registers={k['registers']} spills={k['spills']}")


def test_no_spills_and_registers_leave_occupancy(compiled):
    for k in compiled:
        assert k["spills"] == 0, k
        # 128 threads a program: at most 128 registers keeps 4 programs (16 warps) per SM.
        assert k["registers"] <= 128, k


def test_aligned_specialisations_use_128_bit_accesses(compiled):
    aligned = [k for k in compiled if k["constexprs"]["ALIGNED"]]
    assert aligned
    for k in aligned:
        assert k["global_loads"].get("128", 0) > 0, k
        assert k["global_stores"].get("128", 0) > 0, k
