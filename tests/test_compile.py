"""The custom ops under torch.library's checks and torch.compile: no graph break, same numbers,
no recompilation when a tensor learning rate changes."""

import pytest
import torch

import gefen_compile
from gefen_compile import Gefen, ops


def stepped_optimizer(lr):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 32)), torch.nn.Parameter(torch.randn(32))]
    opt = Gefen(params, lr=lr, weight_decay=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_opcheck_step():
    params, opt = stepped_optimizer(1e-2)
    bucket = opt._buckets[0]
    torch.library.opcheck(ops.step_, opt._kernel_args(bucket, [p.grad for p in bucket.params]))


def test_opcheck_first_step_ops():
    grads = [torch.randn(8, 12), torch.randn(30)]
    torch.library.opcheck(ops.histogram, (grads, [12, 1], [False, True]))
    torch.library.opcheck(ops.first_gradient_facts, (grads, [8, 12, 2, 3, 5], [0, 2, 5]))


class CountingBackend:
    def __init__(self, inner=None):
        self.compiles = 0
        self.inner = inner and torch._dynamo.lookup_backend(inner)

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return self.inner(gm, example_inputs) if self.inner else gm.forward


# The schedulers cannot see steps taken through the step bound before they wrapped it, and say so.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_compiled_step_has_no_graph_break_and_matches_eager():
    params, opt = stepped_optimizer(torch.tensor(1e-2))
    twin_params, twin = stepped_optimizer(torch.tensor(1e-2))
    backend = CountingBackend()
    # Bound before the schedulers wrap opt.step, as for AdamW's compiled step.
    compiled = torch.compile(opt.step, fullgraph=True, backend=backend)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    twin_scheduler = torch.optim.lr_scheduler.StepLR(twin, step_size=1, gamma=0.5)
    for seed in range(4):
        set_grads(params, seed)
        set_grads(twin_params, seed)
        compiled()
        twin.step()
        scheduler.step()
        twin_scheduler.step()
        for p, q in zip(params, twin_params):
            assert torch.equal(p, q)
            assert torch.equal(opt.state[p]["codes"], twin.state[q]["codes"])
    # The scheduler changed the tensor lr every step: data, not a new graph.
    assert backend.compiles == 1
    assert opt.param_groups[0]["lr"].item() == pytest.approx(1e-2 / 16)


def steps_beside(step, twin, params, twin_params, schedules, steps):
    """``steps`` steps of ``step`` and of ``twin`` (eager Gefen) on the same gradients, each
    then a step of every schedule; yields after each, the parameters checked equal."""
    for seed in range(steps):
        set_grads(params, seed)
        set_grads(twin_params, seed)
        step()
        twin.step()
        for schedule in schedules:
            schedule.step()
        assert all(torch.equal(p, q) for p, q in zip(params, twin_params))
        yield seed


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("inner", [None, "inductor"])
def test_compiled_step_under_float_schedules_compiles_once_more(inner):
    # A float lr and betas (OneCycleLR cycles beta1) that change every step: like AdamW's, they
    # become inputs of the graph at their first change, not constants compiled per value.
    params, opt = stepped_optimizer(1e-2)
    twin_params, twin = stepped_optimizer(1e-2)
    backend = CountingBackend(inner)
    compiled = torch.compile(opt.step, fullgraph=True, backend=backend)
    schedules = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=20)
                 for o in (opt, twin)]
    for _ in steps_beside(compiled, twin, params, twin_params, schedules, 6):
        for p, q in zip(params, twin_params):
            assert torch.equal(opt.state[p]["codes"], twin.state[q]["codes"])
    assert opt.param_groups[0]["betas"] == twin.param_groups[0]["betas"] != (0.95, 0.999)
    assert backend.compiles == 2


@pytest.mark.parametrize("converted_by", ["backend", "patch"])
def test_a_converted_adamws_compiled_step_under_a_float_schedule_stops_compiling(converted_by):
    # The scheduler wraps AdamW's step before the conversion (the backend converts at the
    # first step); AdamW's own step reads the float lr outside Gefen's graph.
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 32)), torch.nn.Parameter(torch.randn(32))]
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    if converted_by == "patch":
        with gefen_compile.patched_adamw():
            opt = torch.optim.AdamW(params, lr=1e-2)
    else:
        opt = torch.optim.AdamW(params, lr=1e-2)
    twin = Gefen(twin_params, lr=1e-2)
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, 20) for o in (opt, twin)]
    backend = CountingBackend("gefen" if converted_by == "backend" else "inductor")

    @torch.compile(backend=backend)
    def step():
        opt.step()

    compiles = [backend.compiles
                for _ in steps_beside(step, twin, params, twin_params, schedules, 10)]
    assert type(opt).__name__ == "GefenAdamW"
    assert compiles[-1] == compiles[3], compiles  # the lr changed at every step


def test_inductor_compiled_step_matches_eager():
    params, opt = stepped_optimizer(1e-2)
    twin_params, twin = stepped_optimizer(1e-2)
    compiled = torch.compile(opt.step, backend="inductor")
    for seed in range(2):
        set_grads(params, seed)
        set_grads(twin_params, seed)
        compiled()
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["vmean"], twin.state[q]["vmean"])
