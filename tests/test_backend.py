"""torch.compile(model, backend="gefen"): inductor's results, and any AdamW over the compiled
model's parameters becomes Gefen before allocating AdamW's state."""

import contextlib
import copy
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gefen_compile.backend as gefen_backend
from allocations import Allocations
import gefen_compile
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


def test_a_closure_step_converts_at_its_first_step():
    """Lightning's automatic optimization: the model's first forward and backward (the first
    compiled graph) run inside the step's closure."""
    model, twin_model = mlp(), mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    twin = Gefen(twin_model.parameters(), lr=1e-2)
    compiled = torch.compile(model, backend="gefen")
    twin_compiled = torch.compile(twin_model, backend="gefen")
    losses = []
    for seed in range(3):
        def closure(net=compiled, seed=seed, optimizer=opt):
            optimizer.zero_grad()
            loss = net(batch(seed)).square().mean()
            loss.backward()
            return loss

        returned = opt.step(closure)
        twin.step(lambda seed=seed: closure(twin_compiled, seed, twin))
        losses.append(returned)
        if seed == 0:
            assert isinstance(opt, Gefen) and "exp_avg" not in opt.state[model[0].weight]
    assert all(isinstance(loss, torch.Tensor) and loss.grad_fn is not None for loss in losses)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def test_an_adamw_the_backend_leaves_alone_runs_its_closure_as_before():
    """Over parameters no compiled graph holds: the closure runs once per step, inside the
    optimizer's own step pre-hooks (one that wraps it in autocast, say), and the optimizer
    stays AdamW."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seen = []

    def under_autocast(optimizer, args, kwargs):
        closure = args[1] if len(args) > 1 else kwargs["closure"]

        def wrapped():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return closure()

        return args, {**kwargs, "closure": wrapped}

    opt.register_step_pre_hook(under_autocast)

    def closure():
        opt.zero_grad()
        out = model(batch(0))
        seen.append(out.dtype)
        out.float().square().mean().backward()
        return out

    for _ in range(2):
        opt.step(closure=closure)
    assert seen == [torch.bfloat16] * 2 and type(opt) is torch.optim.AdamW


def test_a_refused_gefen_checkpoint_leaves_the_adamw_unconverted():
    params = list(mlp().parameters())
    saved = Gefen([{"params": params[:2]}, {"params": params[2:]}])
    for p in params:
        p.grad = torch.randn_like(p)
    saved.step()
    opt = torch.optim.AdamW(params)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict(saved.state_dict())
    assert type(opt) is torch.optim.AdamW


def test_a_run_resumes_its_gefen_checkpoint_into_a_fresh_adamw():
    """The resuming script loads before its first step and before its model compiles."""
    def run(steps, start=0, model=None, state_dict=None):
        model = model or mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        compiled = torch.compile(model, backend="gefen")
        if state_dict is not None:
            opt.load_state_dict(state_dict)
            assert isinstance(opt, Gefen)
        for seed in range(start, start + steps):
            opt.zero_grad()
            compiled(batch(seed)).square().mean().backward()
            opt.step()
        return model, opt

    whole, _ = run(5)
    first, opt = run(3)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = mlp()
    resumed.load_state_dict(saved["model"])
    resumed, opt = run(2, 3, resumed, saved["optimizer"])
    for p, q in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(p, q)
    # An AdamW checkpoint still loads as AdamW's.
    adamw = torch.optim.AdamW(mlp().parameters())
    adamw.load_state_dict(torch.optim.AdamW(mlp().parameters()).state_dict())
    assert type(adamw) is torch.optim.AdamW


def test_a_muon_loading_a_gefen_muon_checkpoint_is_converted():
    weights = [torch.nn.Parameter(torch.randn(16, 8)) for _ in range(2)]
    saved = gefen_compile.GefenMuon(weights, lr=1e-2)
    for w in weights:
        w.grad = torch.randn_like(w)
    saved.step()
    muon = torch.optim.Muon(weights, lr=1e-2)
    muon.load_state_dict(saved.state_dict())
    assert isinstance(muon, gefen_compile.GefenMuon)
    for w in weights:
        assert torch.equal(muon.state[w]["codes"].view(-1), saved.state[w]["codes"].view(-1))


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


def test_an_adam_over_a_compiled_models_input_is_left_alone():
    """Style transfer: Adam optimises an image (a plain leaf tensor, not a parameter) through
    a compiled model, whose own AdamW still becomes Gefen."""
    model = mlp()
    image = batch(0).requires_grad_(True)
    adam = torch.optim.Adam([image], lr=0.01)
    adamw = torch.optim.AdamW(model.parameters())
    compiled = torch.compile(model, backend="gefen")
    for _ in range(2):
        compiled(image).square().mean().backward()
        adam.step()
        adamw.step()
    assert type(adam) is torch.optim.Adam and "exp_avg" in adam.state[image]
    assert isinstance(adamw, Gefen)


def test_an_adamw_over_functional_call_tensors_is_left_alone_and_says_how_to_convert(caplog):
    """torch.func.functional_call with plain leaf tensors: inputs of the graph, not the
    model's nn.Parameters, so left as built; the log says how to make it Gefen."""
    model = mlp()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    adamw = torch.optim.AdamW(params.values())
    compiled = torch.compile(lambda p, x: torch.func.functional_call(model, p, (x,)),
                             backend="gefen")
    with caplog.at_level(logging.INFO, logger="gefen_compile"):
        for seed in range(2):
            compiled(params, batch(seed)).square().mean().backward()
            adamw.step()
    assert type(adamw) is torch.optim.AdamW
    assert "not nn.Parameters" in caplog.text and "gefen_compile.convert(optimizer)" in caplog.text


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


def test_graphs_that_slice_compile_also_with_dynamic_shapes():
    # Slices in node arguments are unhashable before Python 3.12; the passes never hash them.
    def fn(x):
        return x[1:] * 2 + x[:-1, None][..., 0]

    for dynamic in (None, True):
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="gefen", dynamic=dynamic)
        for n in (3, 5):
            x = torch.randn(n)
            torch.testing.assert_close(compiled(x), fn(x))


def test_dynamic_means_what_it_means_for_inductor():
    from torch._dynamo.utils import counters

    graphs = {}
    for dynamic in (False, True):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(lambda x: x.sin() * 2, backend="gefen", dynamic=dynamic)
        for n in (3, 5, 7):
            compiled(torch.randn(n))
        graphs[dynamic] = counters["stats"]["unique_graphs"]
    assert graphs == {False: 3, True: 1}


def _autotune_flags(**compile_kwargs):
    """(max_autotune, coordinate_descent_tuning) as inductor's passes saw them, per graph."""
    from torch._inductor import config

    seen = []

    def record(graph):
        seen.append((config.max_autotune, config.coordinate_descent_tuning))

    with config.patch(post_grad_custom_pre_pass=record):
        torch.compile(lambda x: x.sin() * 2, **compile_kwargs)(torch.randn(8))
    return seen


def test_mode_reaches_inductors_config():
    mode = "max-autotune-no-cudagraphs"
    assert _autotune_flags(backend="gefen") == [(False, False)]
    torch._dynamo.reset()
    assert _autotune_flags(backend="gefen", mode=mode) == [(True, True)]
    torch._dynamo.reset()
    assert _autotune_flags(backend="inductor", mode=mode) == [(True, True)]


def test_options_reach_inductors_config():
    ran = []
    compiled = torch.compile(lambda x: x.cos() + 1, backend="gefen",
                             options={"post_grad_custom_pre_pass": ran.append})
    compiled(torch.randn(8))
    assert len(ran) == 1 and isinstance(ran[0], torch.fx.Graph)


def test_unknown_options_raise_inductors_own_error():
    with pytest.raises(RuntimeError) as inductor:
        torch.compile(lambda x: x + 1, backend="inductor", options={"no_such_option": 1})
    with pytest.raises(Exception) as gefen:
        torch.compile(lambda x: x + 1, backend="gefen", options={"no_such_option": 1})(torch.ones(2))
    assert "Unexpected optimization option no_such_option" in str(inductor.value)
    assert str(inductor.value) in str(gefen.value)


def test_graphs_writing_no_parameter_skip_the_passes(monkeypatch, caplog):
    def never(*args, **kwargs):
        raise AssertionError("the passes ran on a graph with no optimizer update")

    monkeypatch.setattr(gefen_backend, "rewrite_adamw_steps", never)
    torch.manual_seed(0)
    # BatchNorm writes its running statistics in place: buffers, not parameters.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    with caplog.at_level(logging.WARNING, logger="gefen_compile"):
        out = torch.compile(model, backend="gefen")(x)
        out.sum().backward()
    torch.testing.assert_close(out, reference(x))
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    assert not caplog.records


def test_a_failing_pass_logs_a_warning_and_compiles_the_graph_as_traced(monkeypatch, caplog):
    def failing(gm, example_inputs, release_state, **kwargs):
        # Half a rewrite, then an unexpected failure: the backend must undo the half.
        gm.register_buffer("gefen_half", torch.zeros(1))
        output = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(output):
            gm.graph.call_function(torch.ops.aten.add_.Tensor, (gm.graph.get_attr("gefen_half"), 1))
        raise RuntimeError("an unexpected failure")

    monkeypatch.setattr(gefen_backend, "rewrite_adamw_steps", failing)
    model, twin_model = mlp(), mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    twin = torch.optim.AdamW(twin_model.parameters(), lr=1e-2)
    with caplog.at_level(logging.WARNING, logger="gefen_compile"):
        for m in (model, twin_model):
            m(batch(0)).square().mean().backward()
        torch.compile(opt.step, backend="gefen")()
    twin.step()
    for p, q in zip(model.parameters(), twin_model.parameters()):  # AdamW's update, as traced
        torch.testing.assert_close(p, q)
    assert "exp_avg" in opt.state[model[0].weight]  # the half rewrite (a get_attr of a
    # buffer it dropped) would not even compile
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "RuntimeError: an unexpected failure" in warnings[0]


def test_a_compiled_step_keeps_no_adamw_tensor_alive():
    """dynamo allocates AdamW's moments while tracing the step; once the rewritten graph has
    run, nothing holds them (nor the first gradients), though dynamo's wrapper of the compiled
    graph copies its attributes."""
    import gc

    torch.manual_seed(0)
    model = torch.nn.Linear(97, 89, bias=False)  # a shape nothing else in the test has
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = torch.compile(opt.step, backend="gefen")
    for seed in range(3):
        model(torch.randn(4, 97, generator=torch.Generator().manual_seed(seed))).square().mean().backward()
        step()
        opt.zero_grad()
    gc.collect()
    alive = [t for t in gc.get_objects()  # real tensors (dynamo's caches keep fake ones)
             if type(t) is torch.Tensor and t.shape == (89, 97)]
    assert isinstance(opt, Gefen) and not alive


def test_a_compiled_first_step_with_an_inf_gradient_fails_as_gefens_changing_nothing():
    """As eager Gefen's first step: the error says to skip the step, and the optimizer is
    untouched (still AdamW, its state as dynamo's trace left it); the next step converts it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = torch.compile(opt.step, backend="gefen")
    model(torch.randn(4, 16)).square().mean().backward()
    model.weight.grad[0, 0] = float("inf")
    with pytest.raises(Exception, match="inf or nan values.*skip this step"):
        step()
    assert type(opt) is torch.optim.AdamW
    assert all(float(s["step"]) == 0 for s in opt.state.values())
    opt.zero_grad()
    model(torch.randn(4, 16)).square().mean().backward()
    step()
    assert isinstance(opt, Gefen) and all("codes" in s for s in opt.state.values())


def test_a_refused_step_graph_runs_eagerly_and_its_optimizer_converts_next_step(caplog):
    """dynamic=True: the passes refuse the step (its hyperparameters are graph inputs). The
    step runs eagerly, as AdamW's, the step hook converts the optimizer at the next step, as an
    eager run converted then, and no graph keeps AdamW's moments alive (dynamo keeps a traced
    step's graph while its optimizer lives)."""
    import gc

    torch.manual_seed(0)
    model = torch.nn.Linear(97, 89, bias=False)  # a shape nothing else in the test has
    twin_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    twin = torch.optim.AdamW(twin_model.parameters(), lr=1e-2)
    step = torch.compile(opt.step, backend="gefen", dynamic=True)
    with caplog.at_level(logging.WARNING, logger="gefen_compile"):
        for seed in range(3):
            if seed == 1:
                twin = gefen_compile.convert(twin)
            for m, o, run in ((model, opt, step), (twin_model, twin, twin.step)):
                o.zero_grad()
                m(torch.randn(4, 97, generator=torch.Generator().manual_seed(seed))).square().mean().backward()
                run()
    assert isinstance(opt, Gefen) and "exp_avg" not in opt.state[model.weight]
    assert any("reads graph input" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(model.weight, twin_model.weight)
    opt.zero_grad()
    twin.zero_grad()
    gc.collect()
    alive = [t for t in gc.get_objects() if type(t) is torch.Tensor and t.shape == (89, 97)]
    assert not alive


def test_a_compiled_muon_step_is_gefen_muons_from_its_second_keeping_no_buffer():
    """The passes match AdamW's update only: a Muon's captured first step runs eagerly, as
    Muon's, and the step hook converts the Muon at the next step; compiled as traced, the graph
    kept the momentum buffers alive for the optimizer's lifetime."""
    import gc

    torch.manual_seed(0)
    model = torch.nn.Linear(97, 89, bias=False)  # a shape nothing else in the test has
    opt = torch.optim.Muon(model.parameters(), lr=2e-2)
    step = torch.compile(opt.step, backend="gefen")
    for seed in range(3):
        opt.zero_grad()
        model(torch.randn(4, 97, generator=torch.Generator().manual_seed(seed))).square().mean().backward()
        step()
        assert isinstance(opt, gefen_compile.GefenMuon) == (seed > 0)
    assert set(opt.state[model.weight]) >= {"codes", "magnitude"}
    opt.zero_grad()
    gc.collect()
    alive = [t for t in gc.get_objects() if type(t) is torch.Tensor and t.shape == (89, 97)]
    assert not alive


def test_two_adamws_whose_steps_compile_apart_both_become_gefen():
    """A GAN's two optimizers (other lr values): dynamo makes the second one's lr a graph
    input (the step's code is shared), the passes refuse that graph, and the optimizer is
    converted at its next step all the same."""
    torch.manual_seed(0)
    generator, critic = torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
    optimizers = [torch.optim.AdamW(generator.parameters(), lr=1e-3),
                  torch.optim.AdamW(critic.parameters(), lr=4e-3)]
    steps = [torch.compile(o.step, backend="gefen") for o in optimizers]
    for seed in range(3):
        for o in optimizers:
            o.zero_grad()
        critic(generator(torch.randn(16, 8, generator=torch.Generator().manual_seed(seed)))).mean().backward()
        for step in steps:
            step()
    assert all(isinstance(o, Gefen) for o in optimizers)
    assert all("exp_avg" not in s for o in optimizers for s in o.state.values())


def test_first_step_work_runs_eagerly_in_a_compiled_step(monkeypatch):
    import gefen_compile.learned_state as optim

    compiling = []
    learn = optim.first_histogram

    def watched(*args):
        compiling.append(torch.compiler.is_compiling())
        return learn(*args)

    monkeypatch.setattr(optim, "first_histogram", watched)
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(x):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    torch.compile(step, backend="gefen")(batch(0))
    assert compiling == [False] and isinstance(opt, Gefen)


def test_compiled_step_with_a_zero_first_gradient_and_an_empty_parameter():
    # LoRA: B starts at zero, so A's first gradient is all zero and Gefen starts A's state at
    # its first non-zero one; an empty parameter never gets state. dynamo's guards read the
    # AdamW state of both (step included) after the backend converted the optimizer.
    def lora(opt_class, compiled):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(4, 8) * 0.1), torch.nn.Parameter(torch.zeros(16, 4))
        empty = torch.nn.Parameter(torch.randn(0, 4))
        opt = opt_class([a, b, empty], lr=1e-2)
        step = torch.compile(opt.step, backend="gefen") if compiled else opt.step
        weight = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
        for seed in range(3):
            opt.zero_grad()
            (batch(seed)[:, :8] @ (weight + b @ a).T).square().mean().backward()
            empty.grad = torch.zeros_like(empty)
            step()
        return opt, (a, b)

    opt, params = lora(torch.optim.AdamW, True)
    _, expected = lora(Gefen, False)
    assert isinstance(opt, Gefen) and "exp_avg" not in opt.state[params[0]]
    for p, q in zip(params, expected):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_an_unrelated_optimizers_fullgraph_step_compiles_as_without_the_backend():
    # The backend's step pre-hook runs eagerly inside compiled steps (a graph break) only where
    # the optimizer has no state yet: a Muon's fullgraph step after an eager first step compiles
    # under inductor once a model has compiled with backend="gefen" in the process, as before.
    other = torch.compile(torch.nn.Linear(4, 4), backend="gefen")
    other(torch.randn(2, 4)).sum().backward()
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8, bias=False)
    opt = torch.optim.Muon(layer.parameters(), lr=1e-2)
    step = torch.compile(opt.step, fullgraph=True, backend="inductor")
    for i in range(3):
        layer(torch.randn(4, 16)).square().sum().backward()
        opt.step() if i == 0 else step()
        opt.zero_grad()
    assert type(opt) is torch.optim.Muon


def test_a_compiled_first_step_with_a_tensor_lr_breaks_no_graph_to_read_it():
    # Reading the lr (is it torch's zero-lr state-allocating step?) broke the graph with
    # dynamo's Tensor.item() warning.
    from torch._dynamo.utils import counters
    model = mlp()
    opt = Gefen(model.parameters(), lr=torch.tensor(1e-3))
    step = torch.compile(opt.step)
    model(batch(0)).square().mean().backward()
    step()
    assert not [reason for reason in counters["graph_break"] if "item()" in reason]
