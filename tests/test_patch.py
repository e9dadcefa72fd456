"""patch_adamw / unpatch_adamw / patched_adamw and the zero-code-change runner."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gefen_compile as gefen
from allocations import Allocations
from gefen_compile.patch import PatchedAdamW, is_patched

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def unpatched():
    yield
    gefen.unpatch_adamw()


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))


def test_patch_makes_both_names_build_gefen_and_unpatch_restores():
    import torch.optim.adamw as adamw_module

    original = torch.optim.AdamW
    params = list(mlp().parameters())
    before = torch.optim.AdamW(params)
    gefen.patch_adamw()
    gefen.patch_adamw()  # twice is harmless
    for build in (torch.optim.AdamW, adamw_module.AdamW):
        opt = build(params, lr=1e-3, weight_decay=0.05)
        assert isinstance(opt, gefen.Gefen) and isinstance(opt, original)
        assert opt.defaults["weight_decay"] == 0.05
    assert isinstance(before, torch.optim.AdamW)  # real AdamWs still pass the check
    gefen.unpatch_adamw()
    assert torch.optim.AdamW is original and adamw_module.AdamW is original
    assert not isinstance(torch.optim.AdamW(params), gefen.Gefen)


def test_context_manager_restores_the_previous_state():
    with gefen.patched_adamw():
        assert is_patched()
        with gefen.patched_adamw():
            pass
        assert is_patched()
    assert not is_patched()


def test_a_subclass_of_the_patched_name_keeps_its_class():
    gefen.patch_adamw()

    class Mine(torch.optim.AdamW):
        pass

    opt = Mine(mlp().parameters())
    assert type(opt) is Mine and isinstance(opt, gefen.Gefen)
    assert issubclass(Mine, PatchedAdamW)


def test_patched_adamw_refuses_what_gefen_cannot_do_and_says_how_to_get_adamw():
    gefen.patch_adamw()
    with pytest.raises(NotImplementedError, match="amsgrad.*unpatch_adamw"):
        torch.optim.AdamW(mlp().parameters(), amsgrad=True)


def step_allocations(make_optimizer, steps=3):
    model = mlp()
    opt = make_optimizer(model.parameters())
    log = Allocations()
    for i in range(steps):
        model(torch.randn(8, 256)).square().mean().backward()
        with log:
            opt.step()
        opt.zero_grad()
    return sum(p.numel() for p in model.parameters()), log, opt


def test_patched_adamw_never_allocates_adamw_state():
    n, log, _ = step_allocations(lambda p: torch.optim.AdamW(p))
    assert log.total() >= 8 * n  # the control: the log sees AdamW's state being allocated
    with gefen.patched_adamw():
        n, log, opt = step_allocations(lambda p: torch.optim.AdamW(p))
    # Codes, magnitudes and second moments (~1 byte/param) plus the codebook's lookup tables
    # (a fixed ~0.5 MiB, whatever the model size); no fp32 tensor of a parameter's size.
    assert log.total() <= 1.1 * n + (1 << 20)
    weight_bytes = 4 * 512 * 256
    assert log.largest_float()[3] < weight_bytes // 4
    assert sum(t.nbytes for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor)) <= 1.1 * n


def run(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          **kwargs)


def test_runner_passes_arguments_and_exit_code_through(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import sys, torch\n"
        "opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])\n"
        "print(type(opt).__name__, sys.argv[1:])\n"
        "sys.exit(int(sys.argv[1]))\n"
    )
    result = run([sys.executable, "-m", "gefen_compile", str(script), "3", "--flag", "x"])
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == "GefenAdamW ['3', '--flag', 'x']"
    if shutil.which("gefen-run"):
        assert run(["gefen-run", str(script), "0"]).stdout.startswith("GefenAdamW")


def test_runner_reports_a_missing_script():
    result = run([sys.executable, "-m", "gefen_compile", "no_such_script.py"])
    assert result.returncode == 2 and "no such script" in result.stderr


@pytest.mark.parametrize("how", ["runner", "backend"])
def test_unmodified_example_trains_with_gefen_state(tmp_path, how):
    report = tmp_path / "report.json"
    args = ["examples/train_gpt.py", "--size", "tiny", "--steps", "4", "--no-plot",
            "--out", str(tmp_path), "--report", str(report)]
    if how == "runner":
        command = [sys.executable, "-m", "gefen_compile", *args, "--optimizer", "adamw"]
    else:
        command = [sys.executable, *args, "--optimizer", "backend"]
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    (summary,) = json.loads(report.read_text())["runs"]
    assert summary["optimizer_class"] == "GefenAdamW"
    assert summary["state_bytes_per_param"] <= 1.1
