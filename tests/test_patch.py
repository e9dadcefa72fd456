"""patch_adamw / unpatch_adamw / patched_adamw and the zero-code-change runner."""

import copy
import inspect
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gefen_compile as gefen
from allocations import Allocations
from gefen_compile.patch import is_patched

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


def test_patched_name_keeps_adamws_signature():
    # nanoGPT: fused = 'fused' in inspect.signature(torch.optim.AdamW).parameters
    expected = inspect.signature(torch.optim.AdamW)
    gefen.patch_adamw()
    assert inspect.signature(torch.optim.AdamW) == expected
    assert "fused" in inspect.signature(torch.optim.AdamW).parameters


def test_the_patched_class_pickles_by_adamws_name():
    """Hugging Face saves the optimizer's class in training_args.bin: loaded where nothing is
    patched (gefen_compile perhaps not installed), it is the real AdamW."""
    gefen.patch_adamw()
    patched = torch.optim.AdamW
    assert repr(patched) == "<class 'torch.optim.adamw.AdamW' (patched: builds Gefen)>"
    saved = pickle.dumps(patched)
    assert pickle.loads(saved) is patched
    gefen.unpatch_adamw()
    assert pickle.loads(saved) is torch.optim.AdamW is EARLY_ADAMW
    # A reference kept since (a config's functools.partial) pickles too: the name, looked up
    # when loaded.
    kept = pickle.dumps(patched)
    assert pickle.loads(kept) is EARLY_ADAMW
    gefen.patch_adamw()
    assert pickle.loads(kept) is patched


EARLY_ADAMW = torch.optim.AdamW  # a reference taken at import time, before any patch
REGISTRY = {"adamw": torch.optim.AdamW}  # as timm's optimizer factory holds the class


def twin_of(params):
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    return twin_params, gefen.Gefen(twin_params, lr=1e-2)


def step_both(opt, params, twin, twin_params, steps=3, grad_scale=1.0):
    """Step ``opt`` and a Gefen twin on the same gradients (the twin's times ``grad_scale``)."""
    for k in range(steps):
        torch.manual_seed(100 + k)
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twin_params, grads):
            p.grad, q.grad = g.clone(), g * grad_scale
        opt.step()
        twin.step()


@pytest.mark.parametrize("build", ["early reference", "registry"])
def test_adamw_built_from_an_earlier_reference_is_gefen_from_its_first_step(build):
    gefen.patch_adamw()
    make = EARLY_ADAMW if build == "early reference" else REGISTRY["adamw"]
    n, log, opt = step_allocations(lambda p: make(p))
    assert type(opt).__name__ == "GefenAdamW"
    # Converted before AdamW allocated anything: ~1 byte/param, no fp32 moment ever.
    assert log.total() <= 1.1 * n + (1 << 20)
    assert log.largest_float()[3] < 4 * 512 * 256 // 4
    params = list(mlp().parameters())
    opt = make(params, lr=1e-2)
    twin_params, twin = twin_of(params)
    step_both(opt, params, twin, twin_params)
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))  # one update per step


def test_an_earlier_reference_loading_a_gefen_checkpoint_is_converted_while_patched(
        no_conversion_at_load):
    """A resumed run loads before its first step; unpatched, AdamW refuses the checkpoint."""
    params = list(mlp().parameters())
    saved = gefen.Gefen(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    saved.step()
    state_dict = saved.state_dict()
    gefen.patch_adamw()
    opt = EARLY_ADAMW(params, lr=1e-2)
    opt.load_state_dict(state_dict)
    assert type(opt).__name__ == "GefenAdamW"
    assert torch.equal(opt.codebook, saved.codebook)
    assert torch.equal(opt.state[params[0]]["codes"].view(-1), saved.state[params[0]]["codes"])
    gefen.unpatch_adamw()
    with pytest.raises(ValueError, match=r"gefen_compile\.adamw_state_dict"):
        EARLY_ADAMW(params).load_state_dict(state_dict)
    assert "load_state_dict" not in vars(torch.optim.Adam)  # nothing left behind


def test_a_subclass_overriding_step_resumes_its_gefen_checkpoint_while_patched(
        no_conversion_at_load):
    """The patch decides such a subclass at its first step, but the checkpoint of a converted
    one says its step reaches AdamW's: loading it converts, and the run goes on as Gefen."""
    _, halves, _ = subclasses(EARLY_ADAMW)
    gefen.patch_adamw()
    params = list(mlp().parameters())
    saved = halves(params, lr=1e-2)
    twin_params, twin = twin_of(params)
    step_both(saved, params, twin, twin_params, steps=2, grad_scale=0.5)
    resumed = halves(params, lr=1e-2)
    resumed.load_state_dict(saved.state_dict())
    assert isinstance(resumed, halves) and isinstance(resumed, gefen.Gefen)
    step_both(resumed, params, twin, twin_params, steps=1, grad_scale=0.5)
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))
    assert all(float(s["step"]) == 3 for s in resumed.state.values())


def test_patch_converts_to_the_variant_asked_for_until_unpatched():
    gefen.patch_adamw(variant="published")
    built = torch.optim.AdamW(mlp().parameters())
    early = EARLY_ADAMW(mlp().parameters())
    early.step()  # converted at its first step, with no gradient: nothing else happens
    assert built.variant.name == early.variant.name == "published"
    gefen.unpatch_adamw()
    later = gefen.convert(EARLY_ADAMW(mlp().parameters()))
    assert later.variant.name == "robust"
    with pytest.raises(ValueError, match="patch_adamw: variant must be one of"):
        gefen.patch_adamw(variant="paper")


def test_unpatch_stops_converting_adamws_at_their_first_step():
    gefen.patch_adamw()
    params = list(mlp().parameters())
    opt = EARLY_ADAMW(params)
    gefen.unpatch_adamw()
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert type(opt) is EARLY_ADAMW and "exp_avg" in opt.state[params[0]]


def test_adamw_with_an_option_gefen_refuses_is_left_as_adamw_at_its_first_step(caplog):
    gefen.patch_adamw()
    params = list(mlp().parameters())
    opt = EARLY_ADAMW(params, amsgrad=True)
    params[0].grad = torch.ones_like(params[0])
    with caplog.at_level("WARNING", logger="gefen_compile"):
        opt.step()
        opt.step()
    assert type(opt) is EARLY_ADAMW and "max_exp_avg_sq" in opt.state[params[0]]
    assert len(caplog.records) == 1 and "amsgrad" in caplog.text


def subclasses(base):
    """AdamW subclasses as libraries write them, deriving from ``base``."""

    class Plain(base):  # only its defaults differ
        def __init__(self, params, lr=1e-2):
            super().__init__(params, lr=lr)

    class HalvesGradients(base):  # does something, then AdamW's update
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad.mul_(0.5)
            return super().step(closure)

    class OwnUpdate(base):  # replaces AdamW's update by its own (plain SGD)
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(p.grad, alpha=-group["lr"])

    return Plain, HalvesGradients, OwnUpdate


@pytest.mark.parametrize("defined", ["before the patch", "while patched"])
def test_subclass_whose_update_is_adamws_is_converted_and_updates_once(defined):
    if defined == "before the patch":
        plain, halves, _ = subclasses(EARLY_ADAMW)
    gefen.patch_adamw()
    if defined == "while patched":
        plain, halves, _ = subclasses(torch.optim.AdamW)
        assert plain.__bases__ == (EARLY_ADAMW,)  # a plain AdamW subclass, as without the patch
    for cls, scale in ((plain, 1.0), (halves, 0.5)):
        params = list(mlp().parameters())
        opt = cls(params, lr=1e-2)
        twin_params, twin = twin_of(params)
        step_both(opt, params, twin, twin_params, grad_scale=scale)
        assert isinstance(opt, cls) and isinstance(opt, gefen.Gefen), cls
        # Bit-identical to Gefen on the gradients the subclass hands to AdamW's step: the update
        # runs once per step, where AdamW's would, after the subclass's own work.
        assert all(torch.equal(p, q) for p, q in zip(params, twin_params)), cls
        assert all(float(s["step"]) == 3 for s in opt.state.values())


@pytest.mark.parametrize("defined", ["before the patch", "while patched"])
def test_subclass_with_an_update_of_its_own_is_left_alone(defined, caplog):
    gefen.patch_adamw()
    _, _, own = subclasses(EARLY_ADAMW if defined == "before the patch" else torch.optim.AdamW)
    params = list(mlp().parameters())
    start = [p.detach().clone() for p in params]
    opt = own(params, lr=1e-2)
    grads = []
    for k in range(3):
        grads.append([torch.randn_like(p) for p in params])
        for p, g in zip(params, grads[-1]):
            p.grad = g.clone()
        with caplog.at_level("WARNING", logger="gefen_compile"):
            opt.step()
    assert type(opt) is own and not isinstance(opt, gefen.Gefen) and not opt.state
    # Decided at its first step (it changed the parameters, though it keeps no state): once.
    assert len(caplog.records) == 1 and "an update of its own" in caplog.text
    for p, p0, *gs in zip(params, start, *grads):
        torch.testing.assert_close(p.detach(), p0 - 1e-2 * sum(gs))  # its update alone


@pytest.mark.parametrize("option", ["amsgrad", "complex parameter"])
def test_patched_adamw_with_an_option_gefen_refuses_is_a_real_adamw_with_a_warning(option, caplog):
    gefen.patch_adamw()
    if option == "amsgrad":
        params, kwargs, state_key = list(mlp().parameters()), {"amsgrad": True}, "max_exp_avg_sq"
    else:
        params = [torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))]
        kwargs, state_key = {}, "exp_avg"
    with caplog.at_level("WARNING", logger="gefen_compile"):
        opt = torch.optim.AdamW(params, **kwargs)
    assert type(opt) is EARLY_ADAMW
    assert len(caplog.records) == 1
    assert ("amsgrad" if option == "amsgrad" else "parameter 0 of param group 0") in caplog.text
    params[0].grad = torch.ones_like(params[0])
    with caplog.at_level("WARNING", logger="gefen_compile"):
        opt.step()  # AdamW's own step, not watched again
    assert type(opt) is EARLY_ADAMW and state_key in opt.state[params[0]]
    assert len(caplog.records) == 1


def test_a_subclass_calling_adamws_init_explicitly_is_decided_by_its_step(caplog):
    """``torch.optim.AdamW.__init__(self, ...)`` in a subclass's constructor: the class is
    kept, and the step rules decide (its own update is left alone, its state saves)."""
    gefen.patch_adamw()

    def explicitly_initialised(base):
        return type(base.__name__, (base,), {"__init__": lambda self, params, lr=1e-2:
                                             torch.optim.AdamW.__init__(self, params, lr=lr)})

    plain, halves, own = (explicitly_initialised(c) for c in subclasses(torch.optim.AdamW))
    for cls, scale in ((plain, 1.0), (halves, 0.5)):
        params = list(mlp().parameters())
        opt = cls(params)
        assert type(opt) is cls
        twin_params, twin = twin_of(params)
        step_both(opt, params, twin, twin_params, grad_scale=scale)
        assert isinstance(opt, cls) and isinstance(opt, gefen.Gefen), cls
        assert all(torch.equal(p, q) for p, q in zip(params, twin_params)), cls
    params = list(mlp().parameters())
    opt = own(params)
    with caplog.at_level("WARNING", logger="gefen_compile"):
        step_both(opt, params, *reversed(twin_of(params)), steps=2)
    assert type(opt) is own and not isinstance(opt, gefen.Gefen)
    assert "an update of its own" in caplog.text
    opt.state_dict()


def test_a_stateless_update_of_its_own_through_p_data_is_left_alone_at_its_first_step(caplog):
    """Old-style code updates p.data, which bumps no version counter: the parameters' sums
    show the change."""
    gefen.patch_adamw()

    class OldStyle(torch.optim.AdamW):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(p.grad.data, alpha=-group["lr"])

    params = list(mlp().parameters())
    opt = OldStyle(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    with caplog.at_level("WARNING", logger="gefen_compile"):
        opt.step()
    assert type(opt) is OldStyle and "an update of its own" in caplog.text


class EveryOther(torch.optim.AdamW):  # optimizer-side accumulation, say
    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.calls = 0

    def step(self, closure=None):
        self.calls += 1
        return super().step(closure) if self.calls % 2 == 0 else None


def test_a_subclass_reaching_adamws_step_only_every_other_call_is_converted_when_it_does():
    gefen.patch_adamw()
    params = list(mlp().parameters())
    opt = EveryOther(params, lr=1e-2)
    twin_params, twin = twin_of(params)
    for k in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twin_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        if k == 0:  # undecided: it pickles and copies as its own class
            for copied in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
                assert type(copied) is EveryOther
        if k % 2:
            twin.step()
    assert isinstance(opt, EveryOther) and isinstance(opt, gefen.Gefen)
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


def with_gradients(params):
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def test_a_probe_resuming_adamw_state_waits_for_a_step_that_changes_something():
    """State loaded before the first step is no sign of an update of its own: the call not
    reaching AdamW's changes nothing, and the next, reaching it, converts (migrating it)."""
    params = with_gradients(list(mlp().parameters()))
    adamw = EARLY_ADAMW(params, lr=1e-2)
    adamw.step()
    gefen.patch_adamw()
    opt = EveryOther(params, lr=1e-2)
    opt.load_state_dict(adamw.state_dict())
    opt.step()
    assert type(opt) is not EveryOther and not isinstance(opt, gefen.Gefen)  # probed still
    opt.step()
    assert isinstance(opt, gefen.Gefen) and "codes" in opt.state[params[0]]


def test_a_probe_steps_meta_parameters_as_adamw_does():
    """Memory planning steps models on the meta device: the probe reads no values there."""
    gefen.patch_adamw()
    with torch.device("meta"):
        params = list(torch.nn.Linear(4, 4).parameters())
    for p in params:
        p.grad = torch.empty_like(p)
    opt = EveryOther(params, lr=1e-2)
    opt.step()
    gefen.unpatch_adamw()
    assert type(opt) is EveryOther


def test_a_group_added_during_a_probe_with_what_gefen_refuses_leaves_it_adamw(caplog):
    gefen.patch_adamw()
    params = with_gradients(list(mlp().parameters()))
    opt = EveryOther(params, lr=1e-2)
    opt.step()  # undecided
    extra = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    extra.grad = torch.randn_like(extra)
    opt.add_param_group({"params": [extra]})
    with caplog.at_level("WARNING", logger="gefen_compile"):
        opt.step()  # reaches AdamW's step, which handles complex parameters
    assert type(opt) is EveryOther and "complex64" in caplog.text
    assert "exp_avg" in opt.state[extra]


def test_unpatching_ends_a_probe():
    gefen.patch_adamw()
    params = with_gradients(list(mlp().parameters()))
    opt = EveryOther(params, lr=1e-2)
    opt.step()
    gefen.unpatch_adamw()
    assert type(opt) is EveryOther
    opt.step()
    assert type(opt) is EveryOther and "exp_avg" in opt.state[params[0]]


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
    # `--` ends the runner's options: what follows the script is the script's, as always.
    result = run([sys.executable, "-m", "gefen_compile", "--quiet", "--", str(script), "4",
                  "--quiet"])
    assert result.returncode == 4, result.stderr
    assert result.stdout.strip() == "GefenAdamW ['4', '--quiet']" and not result.stderr
    if shutil.which("gefen-run"):
        assert run(["gefen-run", str(script), "0"]).stdout.startswith("GefenAdamW")


def test_runner_reports_a_missing_script():
    result = run([sys.executable, "-m", "gefen_compile", "no_such_script.py"])
    assert result.returncode == 2
    assert "python -m gefen_compile: error: no such script" in result.stderr


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
