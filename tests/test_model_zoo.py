"""The three ways in, on models people really train: a plain torch.optim.AdamW under
torch.compile(model, backend="gefen"), the whole training step compiled with backend="gefen",
gefen_compile.patch_adamw() and the runner, each against backend="inductor" with
gefen_compile.Gefen (same losses and parameters within tolerance, the same optimizer state),
with AdamW's state never allocated. The models' graphs hold slices (unhashable before Python
3.12), views, in-place buffer writes and tied and unreached parameters."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gefen_compile
import gefen_compile.backend as gefen_backend
from gefen_compile import Gefen
from zoo_models import LR, MODELS, WEIGHT_DECAY, build, eager_step, state_bytes, train

ROOT = Path(__file__).resolve().parents[1]
GEFEN_STATE = ["codes", "magnitude", "period", "step", "vmean"]
SLICING = {"gpt2", "llama", "bert", "nanogpt"}  # their graphs index tensors with slices


@functools.cache
def reference(name: str) -> tuple[list[float], list[torch.Tensor], int]:
    """backend="inductor" with Gefen: losses, final parameters, optimizer state bytes."""
    model = build(name)
    opt = Gefen(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    losses = train(name, eager_step(name, torch.compile(model, backend="inductor"), opt))
    return losses, [p.detach().clone() for p in model.parameters()], state_bytes(opt)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def check_like_reference(name, losses, params, opt_state_bytes, state_keys):
    ref_losses, ref_params, ref_bytes = reference(name)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-5)
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=LR / 10)
    assert state_keys == GEFEN_STATE  # AdamW's moments are nowhere
    assert opt_state_bytes == ref_bytes


def check_optimizer(name, model, opt, losses):
    assert isinstance(opt, Gefen) and isinstance(opt, torch.optim.AdamW)
    keys = sorted({k for s in opt.state.values() for k in s})
    check_like_reference(name, losses, list(model.parameters()), state_bytes(opt), keys)


@pytest.fixture
def graphs(monkeypatch):
    """For each graph the gefen backend compiles: whether it indexes a tensor with a slice."""
    seen = []
    screen = gefen_backend.writes_a_parameter

    def recording(gm, example_inputs):
        seen.append(any(isinstance(a, slice) for n in gm.graph.nodes for a in _flat(n.args)))
        return screen(gm, example_inputs)

    monkeypatch.setattr(gefen_backend, "writes_a_parameter", recording)
    return seen


def _flat(args):
    for a in args:
        yield from _flat(a) if isinstance(a, (list, tuple)) else (a,)


def check_graphs(name, graphs):
    assert graphs  # the gefen backend compiled the model (no silent fallback to eager)
    if name in SLICING:
        assert any(graphs)


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_model(name, graphs, adamw_state_allocations):
    model = build(name)
    opt = adamw(model)
    losses = train(name, eager_step(name, torch.compile(model, backend="gefen"), opt))
    check_graphs(name, graphs)
    check_optimizer(name, model, opt, losses)
    assert not adamw_state_allocations


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_whole_step(name, graphs, adamw_state_allocations):
    model = build(name)
    opt = adamw(model)
    step = torch.compile(eager_step(name, model, opt), backend="gefen")
    compiled_before = []

    def counted(batch):
        compiled_before.append(len(graphs))
        return step(batch)

    losses = train(name, counted)
    check_graphs(name, graphs)
    check_optimizer(name, model, opt, losses)
    assert not adamw_state_allocations
    # The first step ran Gefen's first-step work eagerly; the second traced the steady-state
    # step once; the third ran compiled code only.
    assert len(graphs) == compiled_before[-1]


@pytest.mark.parametrize("name", list(MODELS))
def test_patch(name, adamw_state_allocations):
    model = build(name)
    gefen_compile.patch_adamw()
    try:
        opt = adamw(model)
    finally:
        gefen_compile.unpatch_adamw()
    losses = train(name, eager_step(name, torch.compile(model, backend="inductor"), opt))
    check_optimizer(name, model, opt, losses)
    assert not adamw_state_allocations


@pytest.mark.parametrize("name", ["nanogpt"])
def test_runner(name, tmp_path):
    out = tmp_path / "run.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    result = subprocess.run(
        [sys.executable, "-m", "gefen_compile", str(ROOT / "tests" / "zoo_train.py"), name,
         str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = torch.load(out)
    check_like_reference(name, run["losses"], run["params"], run["state_bytes"],
                         run["state_keys"])
