"""torch.compile(model, backend="gefen"): inductor's results, and any AdamW over the compiled
model's parameters becomes Gefen before allocating AdamW's state."""

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from allocations import Allocations
from gefen_compile import Gefen

ROOT = Path(__file__).resolve().parents[1]


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))


def batch(seed):
    return torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))


def test_backend_resolves_by_name_in_a_fresh_process_without_import():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Linear(8, 4)\n"
        "opt = torch.optim.AdamW(m.parameters())\n"
        "assert 'gefen_compile' not in sys.modules\n"
        "torch.compile(m, backend='gefen')(torch.randn(2, 8)).sum().backward()\n"
        "opt.step()\n"
        "print(type(opt).__name__, sorted(opt.state[m.weight]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "GefenAdamW ['codes', 'magnitude', 'period', 'step', 'vmean']"


def test_model_graphs_give_inductors_results():
    model = mlp()
    x = batch(0)
    expected = torch.compile(model, backend="inductor")(x)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(model, backend="gefen")(x), expected)


def state_bytes(opt):
    return sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))


def train(model, opt, compiled, steps, allocations=None):
    for seed in range(steps):
        opt.zero_grad()
        compiled(batch(seed)).square().mean().backward()
        # Only the step is watched: dynamo does not compile under a dispatch mode.
        with allocations or contextlib.nullcontext():
            opt.step()


def test_adamw_over_a_compiled_model_becomes_gefen_without_adamw_state(caplog):
    model, twin_model = mlp(), mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    twin = Gefen(twin_model.parameters(), lr=1e-2)
    compiled = torch.compile(model, backend="gefen")
    log = Allocations()
    with caplog.at_level(logging.INFO, logger="gefen_compile"):
        train(model, opt, compiled, 4, log)
    train(twin_model, twin, torch.compile(twin_model, backend="inductor"), 4)
    assert isinstance(opt, torch.optim.AdamW) and isinstance(opt, Gefen)
    float_state = [r for r in log.records if r[2] == torch.float32 and r[1] in
                   {tuple(p.shape) for p in model.parameters()} and "zeros" in r[0]]
    assert not float_state  # AdamW's exp_avg/exp_avg_sq (zeros_like(p)) were never made
    assert any(r[2] == torch.uint8 for r in log.records)  # the log did see the steps: codes
    # Gefen's state, as an eager Gefen holds it: here a quarter of AdamW's 8 bytes/param or
    # less (this small model's biases and 8-row head have period 1: 5 bytes/param each).
    assert state_bytes(opt) == state_bytes(twin) <= 2 * sum(p.numel() for p in model.parameters())
    assert sum("converted torch.optim.adamw.AdamW" in r.getMessage() for r in caplog.records) == 1
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_unrelated_optimizers_are_untouched():
    model, other = mlp(), mlp(1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    adamw_elsewhere = torch.optim.AdamW(other.parameters())
    coupled = torch.optim.Adam(model.parameters(), weight_decay=0.1)
    compiled = torch.compile(model, backend="gefen")
    compiled(batch(0)).sum().backward()
    other(batch(0)).sum().backward()
    for opt in (sgd, adamw_elsewhere, coupled):
        opt.step()
    assert type(sgd) is torch.optim.SGD and type(adamw_elsewhere) is torch.optim.AdamW
    assert type(coupled) is torch.optim.Adam and "exp_avg" in coupled.state[model[0].weight]


def test_adam_without_weight_decay_becomes_gefen():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, opt, torch.compile(model, backend="gefen"), 2)
    assert isinstance(opt, torch.optim.Adam) and isinstance(opt, Gefen)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for_loop"])
def test_compiled_adamw_step_is_gefen_over_several_steps(foreach):
    model, twin_model = mlp(), mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=foreach)
    twin = Gefen(twin_model.parameters(), lr=1e-2)
    step = torch.compile(opt.step, backend="gefen")  # bound before the scheduler wraps it
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 1, 0.7) for o in (opt, twin)]
    for seed in range(5):
        for m in (model, twin_model):
            m.zero_grad()
            m(batch(seed)).square().mean().backward()
        step()
        twin.step()
        for s in schedulers:
            s.step()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))
    assert isinstance(opt, Gefen) and opt.param_groups[0]["lr"] == twin.param_groups[0]["lr"]
