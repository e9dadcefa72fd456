"""GefenMuon against a slow reference (tests/reference.py) and against torch.optim.Muon's
contract: trajectories, kernels, resume, conversion of a Muon's momentum, errors."""

import inspect
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import RefGefenMuon, ref_nearest
from reference_compare import PARAM_TOL, TieAcceptingReference
from test_step_reference import structured_grad

import gefen_compile
from gefen_compile import GefenMuon, convert_at_load, memory_report
from gefen_compile.kernels import momentum
from gefen_compile.orthogonalise import newton_schulz

muon_module = pytest.importorskip("torch.optim._muon")
torch_newton_schulz = muon_module._zeropower_via_newtonschulz

SHAPES = {
    "square": (16, 16),
    "wide": (8, 40),
    "tall": (48, 12),  # Muon's lr ratio sqrt(48 / 12) = 2
    "unstructured": (3, 109),  # too few candidates: period 1, robust blocks 256 + 71
    "late": (8, 16),  # its gradient first appears at step LATE
    "never": (6, 6),  # never gets a gradient
}
LATE, STEPS = 5, 20


def gradients(dtype, seed, steps=STEPS):
    gen = torch.Generator().manual_seed(seed)
    return [
        [
            None if name == "never" or (name == "late" and t < LATE)
            else (torch.randn(shape, generator=gen) if name == "unstructured"
                  else structured_grad(shape, gen)).to(dtype)
            for name, shape in SHAPES.items()
        ]
        for t in range(steps)
    ]


class Reference(TieAcceptingReference, RefGefenMuon):
    pass


def run_both(dtype, variant="robust", seed=0, **hyper):
    gen = torch.Generator().manual_seed(seed + 100)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES.values()]
    ref = Reference(params, torch_newton_schulz, **hyper, variant=variant)
    opt = GefenMuon(params, **hyper, variant=variant)
    ref.optimizer = opt
    for grads in gradients(dtype, seed):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        ref.step(grads)
    return params, opt, ref


def assert_matches(params, opt, ref):
    np.testing.assert_array_equal(opt.codebook.numpy(), ref.codebook)
    for p, ref_p, ref_state in zip(params, ref.params, ref.state):
        if ref_state is None:
            assert not opt.state.get(p)
            continue
        state = opt.state[p]
        assert set(state) == {"period", "codes", "magnitude"}
        assert state["period"] == ref_state["period"]
        assert state["codes"].dtype == torch.uint8 and state["magnitude"].dtype == p.dtype
        np.testing.assert_array_equal(state["codes"].long().numpy(), ref_state["codes"])
        np.testing.assert_array_equal(state["magnitude"].double().numpy(), ref_state["magnitude"])
        torch.testing.assert_close(p.detach(), ref_p, **PARAM_TOL[p.dtype])


@pytest.mark.parametrize("dtype,variant", [
    (torch.float32, "robust"), (torch.bfloat16, "robust"), (torch.float16, "robust"),
    (torch.float64, "robust"), (torch.float32, "published"),
])
def test_trajectory_equals_reference(dtype, variant):
    params, opt, ref = run_both(dtype, variant, lr=2e-2)
    assert_matches(params, opt, ref)
    periods = {name: opt.state[p]["period"] for name, p in zip(SHAPES, params) if opt.state.get(p)}
    assert periods["unstructured"] == 1 and periods["square"] > 1  # both layouts really ran


@pytest.mark.parametrize("hyper", [
    dict(lr=5e-3, weight_decay=0.0, momentum=0.9, nesterov=False),
    dict(lr=1e-3, weight_decay=0.1, momentum=0.5, adjust_lr_fn="match_rms_adamw"),
    dict(lr=1e-2, ns_steps=3, ns_coefficients=(3.0, -3.2, 1.2), eps=1e-5),
])
def test_hyperparameters_follow_reference(hyper):
    ns = (hyper.get("ns_coefficients", (3.4445, -4.7750, 2.0315)), hyper.get("ns_steps", 5),
          hyper.get("eps", 1e-7))
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES.values()]
    short = {k: v for k, v in hyper.items() if k not in ("ns_coefficients", "ns_steps", "eps")}
    ref = Reference(params, torch_newton_schulz, **short, ns=ns)
    opt = GefenMuon(params, **hyper)
    ref.optimizer = opt
    for grads in gradients(torch.float32, 1):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step(grads)
    assert_matches(params, opt, ref)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (1, 64), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_is_muons(shape, dtype):
    x = torch.randn(shape).to(dtype)
    assert torch.equal(newton_schulz(x, (3.4445, -4.7750, 2.0315), 5, 1e-7),
                       torch_newton_schulz(x.clone(), (3.4445, -4.7750, 2.0315), 5, 1e-7))


def _trajectory(dtype):
    gen = torch.Generator().manual_seed(100)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES.values()]
    opt = GefenMuon(params, lr=2e-2)
    for grads in gradients(dtype, 0):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_equals_c_path_on_a_trajectory(monkeypatch, dtype):
    params, opt = _trajectory(dtype)
    monkeypatch.setattr(momentum.native, "library", None)
    params2, opt2 = _trajectory(dtype)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
        if opt.state.get(p):
            assert torch.equal(opt.state[p]["codes"], opt2.state[q]["codes"])


def test_first_step_close_to_muon():
    """With an empty momentum the quantisation error is all that separates the two updates."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=gen)
    g = structured_grad((64, 128), gen)
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt, muon = GefenMuon([ours], lr=0.02), torch.optim.Muon([theirs], lr=0.02)
    for p, o in ((ours, opt), (theirs, muon)):
        p.grad = g.clone()
        o.step()
    step_ours, step_theirs = ours.detach() - w, theirs.detach() - w
    assert (step_ours - step_theirs).norm() < 0.03 * step_theirs.norm()


def test_constructor_and_groups_are_muons():
    ours = inspect.signature(GefenMuon).parameters
    theirs = inspect.signature(torch.optim.Muon).parameters
    assert [n for n in ours if n != "variant"] == list(theirs)
    for name in theirs:
        assert ours[name].default == theirs[name].default, name
    w = torch.nn.Parameter(torch.randn(4, 4))
    assert (GefenMuon([w]).param_groups[0].keys()
            == torch.optim.Muon([torch.nn.Parameter(w.detach().clone())]).param_groups[0].keys())


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "Learning rate should be >= 0"),
    (dict(momentum=-0.1), "momentum should be >= 0"),
    (dict(weight_decay=-1.0), "weight decay should be >= 0"),
    (dict(adjust_lr_fn="cosine"), "Adjust learning rate function cosine is not supported"),
    (dict(ns_steps=100), "Number of steps must be less than 100"),
    (dict(ns_coefficients=(1.0, 2.0)), "Coefficients must be a tuple of exactly 3 values"),
    (dict(variant="fast"), "variant must be one of"),
])
def test_bad_hyperparameters_raise_muons_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GefenMuon([torch.nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_non_matrix_parameters_are_refused_naming_the_split():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"Muon only supports 2D parameters.*parameter 1 of "
                                         r"param group 0.*gefen_compile.Gefen"):
        GefenMuon(model.parameters())
    opt = GefenMuon([model.weight])
    with pytest.raises(ValueError, match="param group 1"):
        opt.add_param_group({"params": [model.bias]})


def test_bad_gradients_raise_errors_naming_the_parameter():
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = GefenMuon([w])
    w.grad = torch.full((8, 8), math.inf)
    with pytest.raises(ValueError, match="first gradient of parameter 0 of param group 0 has inf"):
        opt.step()
    w.grad = torch.randn(8, 8).to_sparse()
    with pytest.raises(RuntimeError, match="Muon does not support sparse gradients"):
        opt.step()


@pytest.mark.parametrize("optimizer", [GefenMuon, gefen_compile.Gefen])
def test_errors_name_a_named_parameter(optimizer):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    if optimizer is GefenMuon:
        with pytest.raises(ValueError, match=r"parameter 1 of param group 0 \(0.bias\)"):
            GefenMuon(model.named_parameters())
    opt = optimizer([(n, p) for n, p in model.named_parameters() if p.dim() == 2])
    model(torch.randn(2, 8)).sum().backward()
    model[1].weight.grad = model[1].weight.grad.to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse.*parameter 1 of param group 0 \(1.weight\)"):
        opt.step()


def test_zero_first_gradient_waits_with_weight_decay_only():
    w = torch.nn.Parameter(torch.ones(8, 8))
    opt = GefenMuon([w], lr=0.1, weight_decay=0.5)
    w.grad = torch.zeros(8, 8)
    opt.step()
    assert not opt.state.get(w) and opt.codebook is None
    torch.testing.assert_close(w.detach(), torch.full((8, 8), 0.95))
    w.grad = structured_grad((8, 8), torch.Generator().manual_seed(0))
    opt.step()
    assert opt.state[w]["period"] >= 1 and opt.codebook is not None


def test_tensor_lr_matches_float_lr():
    runs = []
    for lr in (0.02, torch.tensor(0.02)):
        gen = torch.Generator().manual_seed(5)
        w = torch.nn.Parameter(torch.randn(16, 32, generator=gen))
        opt = GefenMuon([w], lr=lr)
        for _ in range(3):
            w.grad = structured_grad((16, 32), gen)
            opt.step()
        runs.append(w.detach())
    torch.testing.assert_close(*runs, rtol=1e-6, atol=1e-7)


def _training(steps, opt_factory, state_dict=None, start=0):
    gen = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((24, 40), (40, 8))]
    opt = opt_factory(params)
    if state_dict is not None:
        params[0].data, params[1].data = state_dict["params"]
        opt.load_state_dict(state_dict["optimizer"])
    grads = gradients(torch.float32, 9, steps=20)
    for t in range(start, steps):
        for p, s in zip(params, ((24, 40), (40, 8))):
            p.grad = structured_grad(s, torch.Generator().manual_seed(t)) * (1 + t)
        opt.step()
    return params, opt, grads


def test_resume_is_exact():
    make = lambda params: GefenMuon(params, lr=0.01, momentum=0.9)  # noqa: E731
    whole, whole_opt, _ = _training(12, make)
    half, half_opt, _ = _training(6, make)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in half],
                "optimizer": half_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["optimizer"]["state"][0]["codes"].shape == (24, 40)
    resumed, resumed_opt, _ = _training(12, make, saved, start=6)
    for p, q in zip(whole, resumed):
        assert torch.equal(p, q)
        assert resumed_opt.state[q]["codes"].dtype == torch.uint8
        assert torch.equal(whole_opt.state[p]["codes"], resumed_opt.state[q]["codes"])


def test_load_refuses_a_mismatched_state_dict():
    params, opt, _ = _training(2, lambda ps: GefenMuon(ps))
    saved = opt.state_dict()
    saved["state"][0]["magnitude"] = saved["state"][0]["magnitude"][:-1]
    other = GefenMuon([torch.nn.Parameter(p.detach().clone()) for p in params])
    with pytest.raises(ValueError, match="saved state of parameter 0 of param group 0 has "
                                         "magnitude of shape"):
        other.load_state_dict(saved)
    assert not other.state


def test_load_refuses_a_muon_checkpoint_whose_buffer_has_another_shape():
    params, muon = _muon_after(2)
    saved = muon.state_dict()
    saved["state"][1]["momentum_buffer"] = saved["state"][1]["momentum_buffer"].t()
    other = GefenMuon([torch.nn.Parameter(p.detach().clone()) for p in params])
    with pytest.raises(ValueError, match=r"saved momentum_buffer of parameter 1 of param group "
                                         r"0 has shape \(16, 64\)"):
        other.load_state_dict(saved)
    assert not other.state


def _muon_after(steps):
    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((32, 64), (64, 16))]
    muon = torch.optim.Muon(params, lr=0.01)
    for _ in range(steps):
        for p in params:
            p.grad = structured_grad(tuple(p.shape), gen)
        muon.step()
    return params, muon


def _assert_quantises_momentum(opt, params, buffers):
    """Each buffer is stored as the quantisation a step would make: codes of the nearest entry
    to buffer / block max, magnitudes the block max."""
    codebook = opt.codebook.numpy()
    for p, buffer in zip(params, buffers):
        state = opt.state[p]
        block = opt.variant.magnitude_block(p.numel(), state["period"])
        flat = buffer.reshape(-1).numpy()
        for b in range(math.ceil(flat.size / block)):
            m = flat[b * block:(b + 1) * block]
            peak = np.float32(np.abs(m).max())
            assert state["magnitude"][b].item() == peak
            np.testing.assert_array_equal(state["codes"][b * block:(b + 1) * block].numpy(),
                                          ref_nearest(m / peak, codebook))


def test_convert_migrates_a_muons_momentum():
    params, muon = _muon_after(3)
    buffers = [muon.state[p]["momentum_buffer"].clone() for p in params]
    converted = gefen_compile.convert(muon)
    assert converted is muon and isinstance(muon, GefenMuon)
    assert isinstance(muon, torch.optim.Muon)
    assert all("momentum_buffer" not in muon.state[p] for p in params)
    _assert_quantises_momentum(muon, params, buffers)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape)
    muon.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, params))
    periods = [muon.state[p]["period"] for p in params]
    assert memory_report(muon).gefen_bytes == sum(p.numel() * (1 + 4 / period)
                                                  for p, period in zip(params, periods))


def stepped_gefen_muon():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16, 8))
    opt = GefenMuon([weight])
    weight.grad = torch.randn(16, 8)
    opt.step()
    return weight, opt


def test_a_group_edited_between_steps_is_checked_as_built():
    weight, opt = stepped_gefen_muon()
    opt.param_groups[0]["ns_steps"] = 200  # Muon's step refuses it
    before = weight.detach().clone()
    with pytest.raises(ValueError, match=r"ns_steps=200; use an int in \[0, 100\)"):
        opt.step()
    assert torch.equal(weight, before)


def test_a_gefen_muon_checkpoint_fails_torchs_muon_at_its_step_not_silently(monkeypatch):
    # Muon starts a missing momentum buffer from zero: the marker in its place fails instead.
    # (Where the backend was used in the process, or the patch is on, Muon converts at load.)
    monkeypatch.setattr(convert_at_load, "_RULES", {})
    weight, opt = stepped_gefen_muon()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    muon = torch.optim.Muon([torch.nn.Parameter(weight.detach().clone())])
    muon.load_state_dict(saved)
    muon.param_groups[0]["params"][0].grad = torch.randn(16, 8)
    with pytest.raises(AttributeError, match="'bytes' object"):
        muon.step()
    marker = next(iter(muon.state.values()))["momentum_buffer"]
    assert b"load it into gefen_compile.GefenMuon" in marker
    again = GefenMuon([torch.nn.Parameter(weight.detach().clone())])
    again.load_state_dict(saved)
    assert sorted(next(iter(again.state.values()))) == ["codes", "magnitude", "period"]


def test_muon_checkpoint_loads_into_gefen_muon():
    params, muon = _muon_after(3)
    buffers = [muon.state[p]["momentum_buffer"].clone() for p in params]
    opt = GefenMuon(params, lr=0.01)
    opt.load_state_dict(muon.state_dict())
    _assert_quantises_momentum(opt, params, buffers)


def test_memory_report_against_muon():
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((256, 256), (1024, 256), (256, 1024))]
    opt = GefenMuon(params)
    for p in params:
        p.grad = structured_grad(tuple(p.shape), gen)
    opt.step()
    report = memory_report(opt)
    assert report.baseline == "Muon"
    assert report.baseline_bytes == sum(p.nbytes for p in params)
    assert report.gefen_bytes_per_param <= 1.1
    assert "Muon bytes" in str(report)


# ---- the three ways in: backend, patch, runner ----

ROOT = Path(__file__).resolve().parents[1]
# A model trained the usual Muon way: its hidden matrices with Muon, the rest with AdamW.
SCRIPT = """
import torch
from torch.optim import Muon as MuonTakenBeforeThePatch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32),
                            torch.nn.GELU(), torch.nn.Linear(32, 4))
hidden = [model[0].weight, model[2].weight]
rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
muon = {muon}(hidden, lr=0.02)
adamw = torch.optim.AdamW(rest, lr=1e-3)
x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
losses = []
for _ in range(5):
    loss = torch.nn.functional.cross_entropy({model}(x), y)
    muon.zero_grad(); adamw.zero_grad(); loss.backward(); muon.step(); adamw.step()
    losses.append(loss.item())
print(type(muon).__name__, type(adamw).__name__, sorted(muon.state[hidden[0]]),
      losses[-1] < losses[0])
"""


def _run_script(tmp_path, *runner, muon="torch.optim.Muon", model="model"):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(muon=muon, model=model))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *runner, str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("muon", ["torch.optim.Muon", "MuonTakenBeforeThePatch"])
def test_runner_converts_muon_and_adamw(tmp_path, muon):
    result = _run_script(tmp_path, "-m", "gefen_compile", muon=muon)
    assert result.returncode == 0, result.stderr[-3000:]
    # Built from the patched name, or converted at its first step.
    assert result.stdout.split() == ["ConvertedMuon", "GefenAdamW", "['codes',", "'magnitude',",
                                     "'period']", "True"]
    assert "to GefenMuon (2 tensors, 4096 parameters)" in result.stderr


def test_backend_converts_muon_over_compiled_parameters(tmp_path):
    result = _run_script(tmp_path, "-c", "import runpy, sys, torch; "
                         "runpy.run_path(sys.argv[1], run_name='__main__')",
                         model="torch.compile(model, backend='gefen')")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ConvertedMuon", "GefenAdamW", "['codes',", "'magnitude',",
                                     "'period']", "True"]


def test_patch_muon_builds_gefen_muon_until_unpatched(caplog):
    from torch.optim import Muon

    w = torch.nn.Parameter(torch.randn(8, 8))
    gefen_compile.patch_muon()
    try:
        opt = torch.optim.Muon([w], lr=0.02, momentum=0.9)
        assert isinstance(opt, GefenMuon) and isinstance(opt, Muon)
        assert opt.param_groups[0]["momentum"] == 0.9

        class MyMuon(torch.optim.Muon):  # a class statement derives from the real Muon
            pass

        assert MyMuon.__mro__[1] is Muon
        # Muon checks ns_steps only at its first step; the patch when built, leaving it Muon.
        with caplog.at_level("WARNING", logger="gefen_compile"):
            refused = torch.optim.Muon([w], ns_steps=100)
        assert type(refused) is Muon and "less than 100" in caplog.text
        assert torch.optim.AdamW is not GefenMuon  # AdamW is not patched by patch_muon
        assert not isinstance(torch.optim.AdamW([w]), gefen_compile.Gefen)
    finally:
        gefen_compile.unpatch_muon()
    assert torch.optim.Muon is Muon and not isinstance(torch.optim.Muon([w]), GefenMuon)


def _compiled_twins(backend, steps):
    """A model stepped by ``torch.compile(opt.step, fullgraph=True)`` after an eager first
    step, and its eager twin: (params, optimizer) of each."""
    twins = []
    for compiled in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64, bias=False), torch.nn.Tanh(),
                                    torch.nn.Linear(64, 8, bias=False))
        opt = GefenMuon(model.parameters(), lr=0.02)
        step = opt.step
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
        for t in range(steps):
            model.zero_grad()
            model(x).square().mean().backward()
            step()
            if compiled and t == 0:  # the first step learns periods and codebook, eagerly
                step = torch.compile(opt.step, backend=backend, fullgraph=True)
        twins.append((list(model.parameters()), opt))
    return twins


def test_compiled_step_traces_whole_and_equals_eager():
    """The momentum step is a custom op (gefen::momentum_): a compiled step has no graph break,
    and through AOT autograd's eager backend it is the eager step, bit for bit."""
    (params, opt), (eager, eager_opt) = _compiled_twins("aot_eager", 4)
    for p, q in zip(params, eager):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["codes"], eager_opt.state[q]["codes"])


def test_inductor_step_updates_the_state_exactly():
    """Inductor computes the Newton-Schulz bfloat16 products its own way: parameters differ
    from eager ones by up to 0.0036 after two steps of torch.optim.Muon itself (compiled
    against eager, this model, measured), about half a step at lr 0.02. The quantised momentum
    of a compiled step is the eager one exactly."""
    (params, opt), (eager, eager_opt) = _compiled_twins("inductor", 2)
    for p, q in zip(params, eager):
        assert torch.equal(opt.state[p]["codes"], eager_opt.state[q]["codes"])
        assert torch.equal(opt.state[p]["magnitude"], eager_opt.state[q]["magnitude"])
        torch.testing.assert_close(p, q, rtol=0, atol=0.006)


def test_load_refuses_other_optimizers_state_dicts_and_bad_groups():
    a, b = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(16, 8))
    gefen = gefen_compile.Gefen([a])
    a.grad = torch.randn(16, 8)
    gefen.step()
    sgd = torch.optim.SGD([a], lr=0.1, momentum=0.9)
    sgd.step()
    muon = torch.optim.Muon([a])
    muon.step()
    bad_muon = muon.state_dict()
    bad_muon["param_groups"][0]["ns_steps"] = 1000
    opt = GefenMuon([b])
    for saved, message in ((gefen.state_dict(), "has no 'momentum'"),
                           (sgd.state_dict(), "has no 'ns_coefficients'"),
                           (bad_muon, "less than 100.*saved param group 0")):
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(saved)
    assert not opt.state


def test_changed_dtypes_and_edited_state_are_refused_by_name():
    layer = torch.nn.Linear(8, 16, bias=False)
    opt = GefenMuon(layer.parameters())
    layer(torch.randn(4, 8)).sum().backward()
    opt.step()
    layer.half()
    layer.zero_grad()
    layer(torch.randn(4, 8).half()).sum().backward()
    with pytest.raises(ValueError, match="parameter 0 of param group 0 has a gradient of dtype "
                                         "torch.float16.*built for torch.float32"):
        opt.step()
    w = torch.nn.Parameter(torch.randn(16, 8))
    w.grad_dtype = None
    w.grad = torch.randn(16, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype torch.bfloat16, the parameter torch.float32"):
        GefenMuon([w]).step()
    w = torch.nn.Parameter(torch.randn(16, 8))
    opt = GefenMuon([w])
    w.grad = torch.randn(16, 8)
    opt.step()
    opt.state[w]["magnitude"] = torch.zeros(3)
    with pytest.raises(ValueError, match="state of parameter 0 of param group 0 has magnitude of "
                                         "shape \\(3,\\)"):
        opt.step()
    del opt.state[w]["codes"]
    with pytest.raises(ValueError, match="state of parameter 0 of param group 0 has no 'codes'"):
        opt.step()


def test_patches_keep_their_own_variants():
    gefen_compile.patch_adamw(variant="published")
    gefen_compile.patch_muon()
    try:
        assert torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))]).variant.name == "published"
        assert torch.optim.Muon([torch.nn.Parameter(torch.randn(3, 3))]).variant.name == "robust"
        gefen_compile.unpatch_muon()
        assert torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))]).variant.name == "published"
    finally:
        gefen_compile.unpatch_muon()
        gefen_compile.unpatch_adamw()


def test_a_parameter_moved_to_another_device_after_its_first_step_is_named():
    """model.to(device) after a step moves parameters, not the optimizer's state: the next step
    names the parameter and the fix, where the momentum kernel would read another device's
    memory (state moved to the meta device stands in for a model moved to another GPU; a
    parameter on the meta device gets its own error, with GefenMuon's name)."""
    params = [torch.nn.Parameter(torch.randn(8, 16)) for _ in range(2)]
    opt = GefenMuon(params, lr=0.02)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state[params[1]]
    codes, state["codes"] = state["codes"], state["codes"].to("meta")
    with pytest.raises(ValueError, match=r"GefenMuon: parameter 1 of param group 0 is on cpu, "
                                         r"but its state is on meta.*build the optimizer again"):
        opt.step()
    state["codes"] = codes
    torch.utils.swap_tensors(params[1], torch.nn.Parameter(params[1].detach().to("meta")))
    params[1].grad = torch.randn(params[1].shape, device="meta")
    with pytest.raises(ValueError, match=r"GefenMuon: parameter 1 .* on the meta device.*"
                                         r"then GefenMuon\(model.parameters"):
        opt.step()
