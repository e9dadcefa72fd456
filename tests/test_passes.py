"""The FX passes on captured AdamW steps: golden graph texts before and after, the reports, and
the rewritten step against eager Gefen over several steps."""

import copy

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from gefen_compile import Gefen
from gefen_compile.passes import lower_fused, match_adamw, rewrite_adamw_steps, rewrite_state
from gefen_compile.passes.dataflow import value_graph
from graph_text import check_golden, graph_text


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(48, 32), torch.nn.Tanh(), torch.nn.Linear(32, 6))


GROUPS = {
    # Several groups with different hyperparameters; maximize in one, no weight decay in one.
    "groups": lambda m: [
        {"params": m[0].parameters()},
        {"params": m[2].parameters(), "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.95),
         "maximize": True},
    ],
    "one": lambda m: [{"params": m.parameters(), "weight_decay": 0.0}],
}

VARIANTS = {
    "dynamo_foreach": dict(groups="groups", foreach=True, lr=1e-2),
    "dynamo_for_loop": dict(groups="groups", foreach=False, lr=1e-2),
    "dynamo_no_weight_decay": dict(groups="one", foreach=True, lr=1e-2),
    "dynamo_tensor_lr": dict(groups="groups", foreach=False, lr="tensor"),
}


def backward(model, seed):
    model.zero_grad()
    x = torch.randn(16, 48, generator=torch.Generator().manual_seed(seed))
    model(x).square().mean().backward()


def optimizers(variant):
    """An AdamW (to be captured) and an eager Gefen twin on a copy of the model."""
    spec = VARIANTS[variant]
    model, twin_model = mlp(), mlp()
    lr = (lambda: torch.tensor(1e-2)) if spec["lr"] == "tensor" else (lambda: spec["lr"])
    opt = torch.optim.AdamW(GROUPS[spec["groups"]](model), lr=lr(), weight_decay=0.1,
                            foreach=spec["foreach"])
    twin = Gefen(GROUPS[spec["groups"]](twin_model), lr=lr(), weight_decay=0.1)
    return model, opt, twin_model, twin


class Capture:
    """A backend that applies the passes as the "gefen" backend does, keeping what it saw."""

    def __init__(self):
        self.before = self.gm = self.report = None

    def __call__(self, gm, example_inputs):
        self.before = graph_text(gm)
        self.gm, self.report = rewrite_adamw_steps(gm, example_inputs, release_state=False)
        self.inputs = example_inputs

        def run(*args):
            try:
                return self.gm(*args)
            finally:
                self.report.state.release()

        return run


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dynamo_captured_step_is_rewritten_and_matches_eager_gefen(variant):
    model, opt, twin_model, twin = optimizers(variant)
    capture = Capture()
    backward(model, 0)
    backward(twin_model, 0)
    params = list(model.parameters())
    grad_of = {id(p.grad): i for i, p in enumerate(params)}
    torch.compile(opt.step, backend=capture)()
    twin.step()
    after = graph_text(capture.gm)
    check_golden(variant, capture.before, after)
    report = capture.report
    assert len(report.matched.updates) == 4 and len(report.lowered.calls) == 1
    assert after.count("gefen.step_") == 1 and "_foreach" not in after and "lerp" not in after
    assert isinstance(opt, torch.optim.AdamW) and isinstance(opt, Gefen)
    assert all("exp_avg" not in s for s in opt.state.values())  # released after the first run
    for seed in range(1, 5):
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))
        backward(model, seed)
        backward(twin_model, seed)
        # The rewritten graph, run again with the new gradients (and any other input: lr).
        capture.gm(*[params[grad_of[id(x)]].grad if id(x) in grad_of else x
                     for x in capture.inputs])
        twin.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))


def functional_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, eps,
                     weight_decay, foreach):
    """AdamW's update as a user's functional step writes it (capturable: tensor steps)."""
    beta1, beta2 = betas
    if foreach:
        torch._foreach_add_(steps, 1)
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        bias1 = [1 - torch.pow(beta1, s) for s in steps]
        bias2 = [(1 - torch.pow(beta2, s)).sqrt() for s in steps]
        denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(exp_avg_sqs), bias2), eps)
        torch._foreach_addcdiv_(params, exp_avgs, torch._foreach_mul(denom, [b / lr for b in bias1]), -1)
        return
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        s.add_(1)
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2**s).sqrt()).add_(eps)
        p.sub_(lr / (1 - beta1**s) * m / denom)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "for_loop"])
def test_make_fx_functional_step_is_rewritten_and_matches_eager_gefen(foreach):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    backward(model, 0)
    opt.step()  # AdamW state to migrate
    params = list(model.parameters())
    state = [opt.state[p] for p in params]
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=foreach)
    backward(model, 1)
    inputs = (params, [p.grad for p in params], [s["exp_avg"] for s in state],
              [s["exp_avg_sq"] for s in state], [s["step"] for s in state])

    def step(params, grads, exp_avgs, exp_avg_sqs, steps):
        with torch.no_grad():
            functional_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, **hyper)

    gm = make_fx(step)(*inputs)
    flat = [t for group in inputs for t in group]
    before = graph_text(gm)
    gm, matched = match_adamw(gm, flat)
    assert len(matched.updates) == 4 and graph_text(gm) == before  # matching changes nothing
    # The eager twin starts from the same migrated state: a copy of the optimizer, converted.
    twin_model = copy.deepcopy(model)
    twin = Gefen(twin_model.parameters(), lr=1e-2, weight_decay=0.1)
    gm, converted = rewrite_state(gm, matched, flat)
    gm, lowered = lower_fused(gm, matched, converted)
    converted.release()
    twin.load_state_dict(opt.state_dict())
    check_golden(f"make_fx_{'foreach' if foreach else 'for_loop'}", before, graph_text(gm))
    assert len(lowered.calls) == 1 and isinstance(opt, Gefen)
    for seed in range(2, 6):
        for p, q in zip(twin_model.parameters(), params):
            p.grad = q.grad.clone()
        gm(params, [p.grad for p in params], *inputs[2:])
        twin.step()
        assert all(torch.equal(p, q) for p, q in zip(params, twin_model.parameters()))
        backward(model, seed)


def test_graph_without_adamw_passes_unchanged():
    model = mlp()
    captured = {}

    def backend(gm, example_inputs):
        before = graph_text(gm)
        gm, report = rewrite_adamw_steps(gm, example_inputs)
        captured.update(before=before, after=graph_text(gm), report=report)
        return gm.forward

    torch.compile(model, backend=backend)(torch.randn(4, 48))
    assert captured["before"] == captured["after"]
    assert not captured["report"].matched.updates and captured["report"].lowered is None


def test_amsgrad_update_is_not_matched_and_says_why():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), amsgrad=True, foreach=False)
    backward(model, 0)
    seen = {}

    def backend(gm, example_inputs):
        seen["report"] = match_adamw(gm, example_inputs)[1]
        return gm.forward

    torch.compile(opt.step, backend=backend)()
    report = seen["report"]
    assert not report.updates and report.unmatched
    assert any("amsgrad" in why or "gradient with two moments" in why
               for why in report.unmatched.values())


def test_value_graph_of_slices_setitem_and_lists():
    # Slices in node arguments (unhashable before Python 3.12), x[i] = v and ops over lists.
    def f(x, y, buf):
        z = torch.cat([x[1:], y[:2, None][:, 0]])
        buf[0:2] = z[:2]
        return z * 2

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(f, backend=capture)(torch.randn(4), torch.randn(3), torch.zeros(5))
    gm = graphs[0]
    assert any(isinstance(a, slice) for n in gm.graph.nodes for a in n.args)
    values = value_graph(gm)
    x, y, buf = (n for n in gm.graph.nodes if n.op == "placeholder")
    assert values.written() == [buf]
    assert values.leaves(values.final[buf]) == {x, y, buf}


HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)


def fx_step(params, grads, state, after=None, hyper=HYPER, extra=(), update=None):
    """make_fx graph of ``update`` (``functional_adamw``) over ``state`` (then
    ``after(params, exp_avgs)``, whose result the graph returns), and its flat inputs
    (``extra``: inputs it reads through ``hyper``). The tensors are as they were before tracing
    (make_fx ran the step on them)."""
    inputs = (params, grads, [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
              [s["step"] for s in state])
    flat = [t for group in inputs for t in group] + list(extra)
    n = len(params)

    def step(*flat):
        lists = [list(flat[i * n:(i + 1) * n]) for i in range(5)]
        with torch.no_grad():
            values = hyper(*flat[5 * n:]) if callable(hyper) else hyper
            (update or functional_adamw)(*lists, **values)
            return after(lists[0], lists[2]) if after else None

    saved = [t.detach().clone() for t in flat]
    gm = make_fx(step)(*flat)
    with torch.no_grad():
        for t, s in zip(flat, saved):
            t.copy_(s)
    return gm, flat


def stepped_state(opt, params):
    """AdamW's state after one step of ``opt`` (its own step, with the current gradients)."""
    opt.step()
    return [opt.state[p] for p in params]


def test_adamw_subclass_is_left_alone():
    # The backend converts exactly AdamW (or Adam): a subclass may step with an update of its own.
    class OwnUpdate(torch.optim.AdamW):
        pass

    model = mlp()
    params = list(model.parameters())
    opt = OwnUpdate(params, lr=1e-2, weight_decay=0.1)
    backward(model, 0)
    gm, flat = fx_step(params, [p.grad for p in params], stepped_state(opt, params))
    before = graph_text(gm)
    gm, report = rewrite_adamw_steps(gm, flat)
    assert graph_text(gm) == before and type(opt) is OwnUpdate
    assert len(report.matched.updates) == 4 and "not the step of a live" in report.refused


@pytest.mark.parametrize("idle", [True, False], ids=["idle_adamw", "no_optimizer"])
def test_update_over_tensors_of_its_own_passes_unchanged(idle):
    # An AdamW-like update (RAdam's, a user's) over state that is no AdamW's, with an AdamW
    # that never stepped over the same parameters (or none): not that AdamW's step.
    model = mlp()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3) if idle else None
    backward(model, 0)
    state = [{"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),
              "step": torch.zeros(())} for p in params]
    gm, flat = fx_step(params, [p.grad for p in params], state)
    before = graph_text(gm)
    gm, report = rewrite_adamw_steps(gm, flat)
    assert graph_text(gm) == before and report.state is None and report.refused
    assert opt is None or (type(opt) is torch.optim.AdamW and not opt.state)


@pytest.mark.parametrize("after", ["clamp", "read_moment"])
def test_a_refused_rewrite_changes_nothing(after):
    # A write of the parameter after its update (dropped by lowering), or a moment read after
    # it (Gefen keeps none): the graph and the optimizer stay as they were.
    model = mlp()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    backward(model, 0)
    state = stepped_state(opt, params)
    entries = [dict(s) for s in state]
    backward(model, 1)
    then = {"clamp": lambda ps, ms: [p.clamp_(-0.1, 0.1) for p in ps] and None,
            "read_moment": lambda ps, ms: torch.stack([m.norm() for m in ms]).sum()}[after]
    gm, flat = fx_step(params, [p.grad for p in params], state, then)
    before = graph_text(gm)
    gm, report = rewrite_adamw_steps(gm, flat)
    assert graph_text(gm) == before and report.state is None
    assert ("written again" if after == "clamp" else "reads a value") in report.refused
    assert type(opt) is torch.optim.AdamW
    assert all(opt.state[p] == e for p, e in zip(params, entries))


def test_zero_first_gradient_refuses_a_reused_graph():
    # Gefen starts a parameter with an all-zero first gradient (LoRA's A, with B = 0) later:
    # host work a reused graph cannot do. Refused, changing nothing, also outside no_grad.
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(16, 4))]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for p in params:  # the state dynamo allocates while tracing opt.step
        opt.state[p] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p)}
    grads = [torch.zeros(4, 8), torch.randn(16, 4)]
    gm, flat = fx_step(params, grads, [opt.state[p] for p in params])
    values = [p.detach().clone() for p in params]
    gm, report = rewrite_adamw_steps(gm, flat)
    assert report.state is None and "all zero" in report.refused
    assert type(opt) is torch.optim.AdamW
    assert all(torch.equal(p, v) for p, v in zip(params, values))  # no weight decay applied


def test_hyperparameter_inputs_match_and_are_reported():
    # dynamic=True passes float hyperparameters as 0-d tensor inputs, read by the moments too.
    model = mlp()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    backward(model, 0)
    state = stepped_state(opt, params)
    betas = [torch.tensor(0.9), torch.tensor(0.999)]

    def adamw(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, betas, eps, weight_decay,
              foreach):
        beta1, beta2 = betas
        for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
            s.add_(1)
            p.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).add_((1 - beta2) * g * g)
            p.sub_(lr / (1 - beta1**s) * m / ((v / (1 - beta2**s)).sqrt() + eps))

    gm, flat = fx_step(params, [p.grad for p in params], state, extra=betas, update=adamw,
                       hyper=lambda b1, b2: {**HYPER, "betas": (b1, b2)})
    gm, matched = match_adamw(gm, flat)
    assert len(matched.updates) == 4
    gm, report = rewrite_adamw_steps(gm, flat)
    assert "reads graph input" in report.refused and type(opt) is torch.optim.AdamW
