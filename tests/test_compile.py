"""The custom ops under torch.library's checks and torch.compile: no graph break, same numbers,
no recompilation when a tensor learning rate changes."""

import pytest
import torch

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
    torch.library.opcheck(ops.period_scores, (grads, [8, 12, 2, 3, 5], [0, 2, 5]))


class CountingBackend:
    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


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
