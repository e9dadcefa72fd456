"""The generic optimizer contract, applied to Gefen.

These are the behaviours that PyTorch's own optimizer suite (``test/test_optim.py`` with
``torch/testing/_internal/common_optimizers.py``) asks of every optimizer: no-op for
parameters without a gradient, param groups, tensor lr and LR schedulers, ``add_param_group``,
``zero_grad``, closures, step hooks, ``state_dict`` round trips, deepcopy/pickle, ``repr``, the
AdamW constructor, error inputs, ``maximize`` and dtypes. Every check is exact (``torch.equal``)
unless it compares against a hand-computed formula.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import pickle
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, StepLR
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from gefen_compile import Gefen, GefenMuon
from gefen_compile.optim import hyper_table
from gefen_compile.first_step import infer_period
from gefen_compile.variant import PUBLISHED

# A structured matrix (rows of very different scales: period > 1), a vector, a small matrix and
# a 0-dim tensor. Small enough that the whole file runs in a few seconds.
SHAPES = ((16, 12), (12,), (3, 4), ())
STATE_KEYS = {"codes", "magnitude", "vmean", "step", "period"}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# --------------------------------------------------------------------------------------------
# helpers


def grad_for(shape, step: int, index: int, dtype=torch.float32) -> torch.Tensor:
    """A deterministic, nowhere-zero gradient for parameter ``index`` at ``step``; matrices get
    one random scale per row, so their period is > 1."""
    gen = torch.Generator().manual_seed(7919 * step + index)
    g = torch.randn(shape, generator=gen)
    if len(shape) > 1:
        g = g * torch.exp(2 * torch.randn(shape[0], *[1] * (len(shape) - 1), generator=gen))
    g = torch.where(g == 0, 1e-3, g)
    return g.to(dtype)


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def clone_params(params) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params, step: int, sign: float = 1.0, only=None) -> None:
    """Synthetic gradients for ``params`` (indices in ``only``, default all); the rest get None."""
    for i, p in enumerate(params):
        if only is None or i in only:
            p.grad = grad_for(p.shape, step, i, p.dtype) * sign
        else:
            p.grad = None


def run(opt, params, steps: int, start: int = 0, sign: float = 1.0, scheduler=None) -> None:
    for k in range(start, start + steps):
        set_grads(params, k, sign)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def all_params(opt) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def snapshot(opt, params) -> list[dict]:
    """Deep copies of the per-parameter states, in ``params`` order ({} where none)."""
    return [copy.deepcopy(dict(opt.state[p])) if p in opt.state else {} for p in params]


def values(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def assert_tree_equal(a, b, path: str = "") -> None:
    """Exact equality of nested dicts/lists/tuples of tensors and plain values (dtypes too)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, a.keys(), b.keys())
        for key in a:
            assert_tree_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def assert_all_equal(xs, ys) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.dtype == y.dtype and torch.equal(x, y)


@contextlib.contextmanager
def raises_naming(exc_type, *needles):
    """``pytest.raises(exc_type)`` that then checks every needle occurs in the message."""
    with pytest.raises(exc_type) as info:
        yield info
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# --------------------------------------------------------------------------------------------
# constructor: AdamW's signature, defaults and flags


def test_defaults_equal_adamw():
    params = make_params()
    assert Gefen(params).defaults == torch.optim.AdamW(params).defaults


def test_constructor_signature_equals_adamw():
    def describe(cls):
        sig = inspect.signature(cls.__init__)
        return {name: (p.kind, p.default) for name, p in sig.parameters.items()}

    def positional(cls):
        sig = inspect.signature(cls.__init__)
        return [n for n, p in sig.parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD]

    assert positional(Gefen) == positional(torch.optim.AdamW)
    # AdamW's signature, plus the keyword-only choice of Gefen's variant.
    gefen = describe(Gefen)
    assert gefen.pop("variant") == (inspect.Parameter.KEYWORD_ONLY, "robust")
    assert gefen == describe(torch.optim.AdamW)
    # So a call written for AdamW with every positional argument works unchanged.
    args = (1e-3, (0.9, 0.999), 1e-8, 1e-2, False)
    params = make_params()
    assert Gefen(params, *args).defaults == torch.optim.AdamW(params, *args).defaults


@pytest.mark.parametrize(
    "flags",
    [
        {"foreach": True},
        {"foreach": False},
        {"fused": True},
        {"fused": False},
        {"capturable": True},
        {"amsgrad": False},
        {"differentiable": False},
        {"maximize": False},
    ],
    ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()),
)
def test_adamw_flags_accepted_recorded_and_same_math(flags):
    ref_params, params = make_params(), make_params()
    ref, opt = Gefen(ref_params), Gefen(params, **flags)
    for key, value in flags.items():
        assert opt.param_groups[0][key] == value
    run(ref, ref_params, 3)
    run(opt, params, 3)
    assert_all_equal(params, ref_params)


# --------------------------------------------------------------------------------------------
# parameters without a gradient


def test_step_skips_params_without_grad_and_late_grad_uses_existing_codebook():
    # Published: the robust default would learn these few values' thin codebook again
    # (tests/test_robust_variant.py).
    params = make_params()
    opt = Gefen(params, lr=1e-2, variant="published")
    late, idle = 1, 3
    initial = values(params)
    for k in range(3):
        set_grads(params, k, only={0, 2})
        opt.step()
    for i in (late, idle):
        assert torch.equal(params[i], initial[i])
        assert not opt.state.get(params[i]), "a parameter without grad must get no state"
        assert i not in opt.state_dict()["state"]
    assert not torch.equal(params[0], initial[0])
    codebook = opt.codebook.clone()

    # params[1]'s gradient appears for the first time; params[0] has none this step.
    before = values(params)
    kept_state = snapshot(opt, params)
    set_grads(params, 3, only={late, 2})
    first_grad = params[late].grad.clone()
    opt.step()
    assert torch.equal(opt.codebook, codebook), "a late parameter must reuse the codebook"
    state = opt.state[params[late]]
    assert state.keys() == STATE_KEYS
    assert state["period"] == infer_period(first_grad, PUBLISHED)
    assert float(state["step"]) == 1
    assert not torch.equal(params[late], before[late])
    # params[0] (no grad this step) and params[3] (never a grad) are untouched.
    for i in (0, idle):
        assert torch.equal(params[i], before[i])
        assert_tree_equal(snapshot(opt, params)[i], kept_state[i])
    assert float(opt.state[params[2]]["step"]) == 4


def test_zero_grad_sets_none_and_then_step_is_noop():
    params = make_params()
    opt = Gefen(params)
    run(opt, params, 2)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    before, state = values(params), snapshot(opt, params)
    opt.step()
    assert_all_equal(params, before)
    assert_tree_equal(snapshot(opt, params), state)

    set_grads(params, 5)
    opt.zero_grad(set_to_none=False)
    for p in params:
        assert p.grad is not None and not p.grad.any()


# --------------------------------------------------------------------------------------------
# param groups: lr and weight_decay


@pytest.mark.parametrize("edit", ["in place", "new list", "new group"])
def test_param_groups_edited_by_hand_are_followed_as_adamw_follows_them(edit):
    """After steps, a parameter added to a group's "params" by hand (in place, as a new list,
    or in a group appended to param_groups) steps from then on, and one removed stops."""
    params = make_params()
    kept, removed, added = params[:2], params[2], params[3]
    opt = Gefen([*kept, removed])
    set_grads(params, 0)
    opt.step()
    group = opt.param_groups[0]
    if edit == "in place":
        del group["params"][2]  # removed
        group["params"].append(added)
    elif edit == "new list":
        group["params"] = [*kept, added]
    else:
        del group["params"][2]  # removed
        opt.param_groups.append({**{k: v for k, v in group.items() if k != "params"},
                                 "params": [added]})
    before_removed, before_added = removed.detach().clone(), added.detach().clone()
    run(opt, params, 2, start=1)
    assert torch.equal(removed, before_removed)
    assert not torch.equal(added, before_added) and opt.state[added]["step"] == 2


def test_param_group_lr_and_weight_decay_scale_the_update():
    """Three groups over equal values and equal gradients (fp64): the update scales with lr, is
    a descent direction, and decoupled weight decay multiplies by (1 - lr * wd) first."""
    shape = SHAPES[0]
    start = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fast, slow, decayed = (nn.Parameter(start.clone()) for _ in range(3))
    lr_fast, lr_slow, wd = 1e-2, 1e-3, 0.5
    opt = Gefen(
        [
            {"params": [fast], "lr": lr_fast, "weight_decay": 0.0},
            {"params": [slow], "lr": lr_slow, "weight_decay": 0.0},
            {"params": [decayed], "lr": lr_slow, "weight_decay": wd},
        ]
    )
    for k in range(3):
        g = grad_for(shape, k, 0, torch.float64)
        for p in (fast, slow, decayed):
            p.grad = g.clone()
        prev_fast, prev_slow, prev_decayed = values([fast, slow, decayed])
        opt.step()
        d_fast, d_slow = fast.detach() - prev_fast, slow.detach() - prev_slow
        assert d_slow.abs().sum() > 0
        torch.testing.assert_close(d_fast, d_slow * (lr_fast / lr_slow), rtol=1e-8, atol=1e-12)
        assert (d_slow * g).sum() < 0, "the update must go against the gradient"
        expected = prev_decayed * (1 - lr_slow * wd) + d_slow
        torch.testing.assert_close(decayed.detach(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "lr, weight_decay, grads, expected_factor",
    [
        (0.0, 0.0, "random", 1.0),
        (0.0, 0.1, "random", 1.0),
        (1e-2, 0.0, "zero", 1.0),
        (1e-2, 0.1, "zero", 1 - 1e-2 * 0.1),
    ],
    ids=["lr0", "lr0-wd", "zero-grad", "zero-grad-wd"],
)
def test_group_without_gradient_step(lr, weight_decay, grads, expected_factor):
    """lr=0 freezes a group whatever its gradient; a zero gradient moves a group only by its
    weight decay (and, an all-zero first gradient teaching nothing, sets up no state); another
    group keeps training meanwhile."""
    active, probe = make_params(seed=1), make_params(seed=2)
    opt = Gefen(
        [{"params": active}, {"params": probe, "lr": lr, "weight_decay": weight_decay}]
    )
    start_active, expected = values(active), values(probe)
    for k in range(3):
        set_grads(active, k)
        if grads == "random":
            set_grads(probe, k + 100)
        else:
            for p in probe:
                p.grad = torch.zeros_like(p)
        opt.step()
        expected = [e * expected_factor for e in expected]
        if expected_factor == 1.0:
            assert_all_equal(probe, expected)
        else:
            for p, e in zip(probe, expected):
                torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=0)
    if grads == "random":
        assert all(float(opt.state[p]["step"]) == 3 for p in probe)
    else:
        assert not any(opt.state.get(p) for p in probe)
    assert all(not torch.equal(p, s) for p, s in zip(active, start_active))


# --------------------------------------------------------------------------------------------
# tensor lr and LR schedulers


@pytest.mark.parametrize("lr", [1e-3, 0.1])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_tensor_lr_equals_float_lr(lr, weight_decay):
    tensor_lr = torch.tensor(lr)
    a, b = make_params(), make_params()
    opt_tensor = Gefen(a, lr=tensor_lr, weight_decay=weight_decay)
    opt_float = Gefen(b, lr=tensor_lr.item(), weight_decay=weight_decay)
    run(opt_tensor, a, 4)
    run(opt_float, b, 4)
    assert_all_equal(a, b)
    assert isinstance(opt_tensor.param_groups[0]["lr"], torch.Tensor)


def test_tensor_lr_tables_of_two_optimizers_are_their_own():
    """Two optimizers may step at once in two threads (the C step releases the GIL): each reads
    its own tensor lr, never the other's, written into a table they share."""
    a = Gefen(make_params(), lr=torch.tensor(1e-3))
    b = Gefen(make_params(), lr=torch.tensor(1e-1))
    table_a = hyper_table(a.param_groups, torch.device("cpu"))
    hyper_table(b.param_groups, torch.device("cpu"))  # b's step, between a's tables and kernel
    assert table_a[0, 0] == a.param_groups[0]["lr"].double()


def test_one_element_tensor_hyperparameters_of_any_shape_step_as_0d_ones():
    """AdamW accepts a shape (1,) lr and betas like tensor([[[0.9]]]) (squeezed in its
    constructor); so does Gefen, with the trajectory of the 0-d values."""
    a, b = make_params(), make_params()
    shaped = Gefen(a, lr=torch.tensor([1e-2]), betas=(torch.tensor([[[0.9]]]), torch.tensor([[0.99]])),
                   capturable=True)
    plain = Gefen(b, lr=torch.tensor(1e-2), betas=(torch.tensor(0.9), torch.tensor(0.99)),
                  capturable=True)
    assert [beta.shape for beta in shaped.param_groups[0]["betas"]] == [(), ()]
    run(shaped, a, 3)
    run(plain, b, 3)
    assert_all_equal(a, b)


class Pair(Sequence):
    """A sequence that is neither a tuple nor a list, as the ListConfig a Hydra config gives."""

    def __init__(self, *items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize("betas", [Pair(0.8, 0.99), np.array([0.8, 0.99]), [0.8, 0.99]],
                         ids=["Sequence", "ndarray", "list"])
def test_betas_may_be_any_sequence_of_two_as_for_adamw(betas):
    a, b, c = make_params(), make_params(), make_params()
    given = Gefen(a, lr=1e-2, betas=betas)
    plain = Gefen(b, lr=1e-2, betas=(0.8, 0.99))
    grouped = Gefen(c[:2], lr=1e-2, betas=(0.8, 0.99))
    grouped.add_param_group({"params": c[2:], "betas": betas})
    assert given.param_groups[0]["betas"] == (0.8, 0.99)  # stored as a tuple, as AdamW's are
    for opt, params in ((given, a), (plain, b), (grouped, c)):
        run(opt, params, 3)
    assert_all_equal(a, b)
    assert_all_equal(c, b)


@pytest.mark.parametrize("betas", [(0.9,), (0.9, 0.99, 0.5)], ids=["one", "three"])
def test_betas_set_to_another_length_mid_training_are_refused_changing_nothing(betas):
    """As AdamW's step fails unpacking them; a row of another length read by the kernels
    shifted every column (and read past the table's end)."""
    params = make_params()
    opt = Gefen(params, lr=1e-2)
    run(opt, params, 1)
    before = [p.detach().clone() for p in params]
    opt.param_groups[0]["betas"] = betas
    with pytest.raises(ValueError, match=r"betas must be a pair \(beta1, beta2\), got .*group 0"):
        run(opt, params, 1)
    assert_all_equal(params, before)


SCHEDULERS = {
    "StepLR": lambda opt: StepLR(opt, step_size=2, gamma=0.1),
    "LambdaLR": lambda opt: LambdaLR(opt, lambda epoch: 1.0 / (epoch + 1)),
}


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("lr_type", [float, torch.tensor])
def test_lr_scheduler_drives_the_step_size_as_with_adamw(name, lr_type):
    """With a scheduler, Gefen's trajectory equals Gefen's with the same lrs set by hand, and
    the lr sequence is AdamW's under the same scheduler."""
    params, manual = make_params(), make_params()
    opt = Gefen(params, lr=lr_type(0.05))
    scheduler = SCHEDULERS[name](opt)
    adamw = torch.optim.AdamW(make_params(), lr=lr_type(0.05))
    adamw_scheduler = SCHEDULERS[name](adamw)
    manual_opt = Gefen(manual, lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(5):
            lr_now = float(opt.param_groups[0]["lr"])
            assert lr_now == float(adamw.param_groups[0]["lr"])
            manual_opt.param_groups[0]["lr"] = lr_now
            run(opt, params, 1, start=k, scheduler=scheduler)
            run(manual_opt, manual, 1, start=k)
            adamw.step()
            adamw_scheduler.step()
            assert_all_equal(params, manual)
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]
    assert float(opt.param_groups[0]["lr"]) < 0.05


@pytest.mark.parametrize("lr_type", [float, torch.tensor])
def test_lambda_lr_to_zero_freezes_params(lr_type):
    params = make_params()
    opt = Gefen(params, lr=lr_type(0.05))
    scheduler = LambdaLR(opt, lambda epoch: 1.0 if epoch < 2 else 0.0)
    start = values(params)
    run(opt, params, 2, scheduler=scheduler)
    assert float(opt.param_groups[0]["lr"]) == 0.0
    frozen = values(params)
    assert all(not torch.equal(p, s) for p, s in zip(frozen, start))
    run(opt, params, 3, start=2, scheduler=scheduler)
    assert_all_equal(params, frozen)
    assert float(opt.state[params[0]]["step"]) == 5


# --------------------------------------------------------------------------------------------
# add_param_group


def test_add_param_group_after_steps():
    params = make_params()
    opt = Gefen(params[:2], lr=1e-2, variant="published")  # see the test above
    run(opt, params[:2], 2)
    codebook = opt.codebook.clone()
    opt.add_param_group({"params": params[2:], "lr": 0.05})
    group = opt.param_groups[-1]
    assert group["lr"] == 0.05
    for key, default in opt.defaults.items():
        if key != "lr":
            assert group[key] == default
    before = values(params)
    run(opt, params, 1, start=2)
    assert torch.equal(opt.codebook, codebook)
    assert [float(opt.state[p]["step"]) for p in params] == [3, 3, 1, 1]
    assert all(not torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize(
    "make_group, exc_type, needles",
    [
        (lambda ps: {"params": [ps[0]]}, ValueError, ["more than one parameter group"]),
        (lambda ps: {"params": [ps[2]], "lr": -1.0}, ValueError, ["lr", "param group 1"]),
        (lambda ps: {"params": [ps[2]], "amsgrad": True}, NotImplementedError, ["amsgrad"]),
        (
            lambda ps: {"params": [torch.zeros(3, dtype=torch.int64)]},
            TypeError,
            ["torch.int64", "param group 1", "leave this tensor out"],
        ),
        (
            lambda ps: {"params": [torch.zeros(3, dtype=torch.complex64)]},
            TypeError,
            ["torch.complex64", "param group 1", "view_as_real"],
        ),
    ],
    ids=["duplicate", "negative-lr", "amsgrad", "int64", "complex64"],
)
def test_add_param_group_rejects_and_leaves_optimizer_unchanged(make_group, exc_type, needles):
    params = make_params()
    opt = Gefen(params[:2])
    groups_before = [dict(g, params=list(g["params"])) for g in opt.param_groups]
    with raises_naming(exc_type, *needles):
        opt.add_param_group(make_group(params))
    assert len(opt.param_groups) == len(groups_before), "a rejected group must not be added"
    for group, saved in zip(opt.param_groups, groups_before):
        assert group.keys() == saved.keys()
        assert all(group[k] is saved[k] or group[k] == saved[k] for k in saved if k != "params")
        assert all(a is b for a, b in zip(group["params"], saved["params"]))
    run(opt, params[:2], 1)


# --------------------------------------------------------------------------------------------
# closures and hooks


def quadratic(params) -> torch.Tensor:
    return sum((p.float() ** 2).sum() * (i + 1) for i, p in enumerate(params))


def test_step_with_closure_evaluates_it_first_and_returns_its_loss():
    params, reference = make_params(), make_params()
    opt = Gefen(params, lr=1e-2)
    calls = []

    def closure():
        calls.append((torch.is_grad_enabled(), values(params)))
        opt.zero_grad()
        loss = quadratic(params)
        loss.backward()
        return loss

    start = values(params)
    loss = opt.step(closure)
    assert len(calls) == 1
    grad_enabled, seen = calls[0]
    assert grad_enabled, "step() must run the closure with grad enabled"
    assert_all_equal(seen, start)
    assert isinstance(loss, torch.Tensor) and loss.item() == quadratic(start).item()

    # Same result as evaluating the loss by hand, then step().
    ref_opt = Gefen(reference, lr=1e-2)
    quadratic(reference).backward()
    ref_opt.step()
    assert_all_equal(params, reference)
    assert quadratic(params).item() < loss.item()


def test_step_hooks_run_in_order():
    params = make_params()
    opt = Gefen(params)
    events, start = [], values(params)

    def hook(name, expect_updated):
        def record(optimizer, args, kwargs):
            assert optimizer is opt
            updated = not torch.equal(params[0], start[0])
            assert updated == expect_updated, name
            events.append(name)

        return record

    handles = [
        register_optimizer_step_pre_hook(hook("global pre", False)),
        opt.register_step_pre_hook(hook("pre", False)),
        opt.register_step_post_hook(hook("post", True)),
        register_optimizer_step_post_hook(hook("global post", True)),
    ]
    try:
        set_grads(params, 0)
        opt.step(lambda: events.append("closure"))
    finally:
        for handle in handles:
            handle.remove()
    assert events == ["global pre", "pre", "closure", "post", "global post"]
    events.clear()
    set_grads(params, 1)
    opt.step()
    assert events == [], "removed hooks must not run"


# --------------------------------------------------------------------------------------------
# state_dict


def expected_lengths(n: int, period: int, variant: str = "robust") -> tuple[int, int]:
    """(magnitude, vmean) lengths of an n-element tensor of the given period: period-1 blocks
    of 256 with a shorter last one (robust), or of Q, the largest divisor up to 256."""
    if period > 1:
        return n // period, n // period
    if variant == "robust":
        return -(-n // 256), n
    q = max(d for d in range(1, min(n, 256) + 1) if n % d == 0)
    return n // q, n


@pytest.mark.parametrize("variant", ["robust", "published"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_layout_and_determinism(dtype, variant):
    params = make_params(dtype)
    opt = Gefen(params, variant=variant)
    empty = opt.state_dict()
    assert empty["codebook"] is None and empty["state"] == {} and empty["variant"] == variant
    run(opt, params, 1)
    first = opt.state_dict()
    # These few elements give a thin first codebook, which the robust variant keeps provisional,
    # with its histogram (tests/test_robust_variant.py), learned again at the next step.
    provisional = {"codebook_histogram"} if variant == "robust" else set()
    assert first.keys() == {"state", "param_groups", "codebook", "variant"} | provisional
    if provisional:
        histogram = first["codebook_histogram"]
        assert histogram.dtype == torch.int64 and histogram.shape == (4096,)
        assert int(histogram.sum()) == sum(p.numel() for p in params)
    run(opt, params, 1, start=1)
    sd = opt.state_dict()
    assert_tree_equal(sd, opt.state_dict())
    assert sd.keys() - provisional == {"state", "param_groups", "codebook", "variant"}
    assert sd["variant"] == variant
    codebook = sd["codebook"]
    assert codebook.dtype == torch.float32 and codebook.shape == (256,)
    assert codebook[0] == -1 and codebook[-1] == 1 and bool((codebook.diff() >= 0).all())
    assert sd["param_groups"][0]["params"] == list(range(len(params)))
    for i, p in enumerate(params):
        entry = sd["state"][i]
        # The step counter is saved as "gefen_step"; "step" holds the marker that makes a plain
        # AdamW refuse the state_dict (tests/test_checkpoint.py).
        assert entry.keys() == STATE_KEYS | {"gefen_step"}
        assert isinstance(entry["step"], bytes)
        assert isinstance(entry["period"], int) and p.numel() % entry["period"] == 0
        assert entry["codes"].dtype == torch.uint8 and entry["codes"].shape == p.shape
        assert entry["magnitude"].dtype == entry["vmean"].dtype == dtype
        lengths = expected_lengths(p.numel(), entry["period"], variant)
        assert (entry["magnitude"].numel(), entry["vmean"].numel()) == lengths
        assert float(entry["gefen_step"]) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("steps_before", [0, 3])
@pytest.mark.parametrize("transport", ["torch.save", "in-memory"])
def test_state_dict_round_trip_resumes_bit_identically(dtype, steps_before, transport):
    params = make_params(dtype)
    opt = Gefen(params, lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05)
    run(opt, params, steps_before)
    if transport == "torch.save":
        buffer = io.BytesIO()
        torch.save({"params": [p.detach() for p in params], "optim": opt.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        resumed = [nn.Parameter(t) for t in saved["params"]]
        optim_state = saved["optim"]
    else:
        resumed = clone_params(params)
        optim_state = opt.state_dict()
    resumed_opt = Gefen(resumed, lr=0.5)  # hyperparameters come from the state_dict
    resumed_opt.load_state_dict(optim_state)

    assert_tree_equal(resumed_opt.state_dict(), opt.state_dict())
    assert len(resumed_opt.state) == (len(resumed) if steps_before else 0)
    for p in resumed[: len(resumed_opt.state)]:
        state = resumed_opt.state[p]
        assert state["codes"].dtype == torch.uint8
        assert state["magnitude"].dtype == state["vmean"].dtype == dtype
    assert resumed_opt.param_groups[0]["lr"] == 1e-2

    run(opt, params, 4, start=steps_before)
    run(resumed_opt, resumed, 4, start=steps_before)
    assert_all_equal(resumed, params)
    assert_tree_equal(resumed_opt.state_dict(), opt.state_dict())


def test_named_parameters_state_dict_round_trip():
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 2))
    clone = copy.deepcopy(model)
    opt = Gefen(model.named_parameters())
    run(opt, list(model.parameters()), 2)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    clone.load_state_dict(model.state_dict())
    clone_opt = Gefen(clone.named_parameters())
    clone_opt.load_state_dict(sd)
    run(opt, list(model.parameters()), 2, start=2)
    run(clone_opt, list(clone.parameters()), 2, start=2)
    assert_all_equal(list(clone.parameters()), list(model.parameters()))


@pytest.mark.parametrize(
    "saved_layout, live_layout",
    [((2, 2), (4,)), ((2, 2), (1, 3)), ((2, 2), (2,)), ((4,), (2, 2))],
    ids=["fewer-groups", "other-sizes", "missing-group", "more-groups"],
)
def test_load_state_dict_with_mismatched_groups_raises(saved_layout, live_layout):
    def grouped(params, layout):
        out, i = [], 0
        for size in layout:
            out.append({"params": params[i : i + size]})
            i += size
        return out

    params = make_params()
    opt = Gefen(grouped(params, saved_layout))
    run(opt, params, 1)
    live_params = clone_params(params)
    live = Gefen(grouped(live_params, live_layout))
    with raises_naming(ValueError, "param groups", "same groups"):
        live.load_state_dict(opt.state_dict())
    assert live.codebook is None and not live.state


def test_load_state_dict_without_codebook_raises():
    # (An AdamW state_dict is converted instead: tests/test_convert.py.)
    params = make_params()
    other = Gefen(params)
    run(other, params, 1)
    state_dict = other.state_dict()
    state_dict.pop("codebook", None)
    fresh = Gefen(clone_params(params))
    with raises_naming(ValueError, "codebook", "load it into"):
        fresh.load_state_dict(state_dict)
    assert fresh.codebook is None and not fresh.state


def test_state_saved_for_a_parameter_of_another_shape_is_refused_at_load():
    """Two parameters of equal size and dtype but other shapes, loaded in the other order (a
    refactored model): AdamW refuses at its next step; Gefen refuses the load, naming both
    shapes, and loads nothing."""
    params = [nn.Parameter(torch.randn(64, 16)), nn.Parameter(torch.randn(16, 64))]
    saver = Gefen(params)
    run(saver, params, 2)
    swapped = clone_params(params[::-1])
    loader = Gefen(swapped)
    with raises_naming(ValueError, "parameter 0 of param group 0", "(64, 16)", "(16, 64)"):
        loader.load_state_dict(saver.state_dict())
    assert not loader.state
    Gefen(clone_params(params)).load_state_dict(saver.state_dict())  # the same order loads


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda ps: torch.optim.AdamW(ps, amsgrad=True),
         ["amsgrad=True", "load this checkpoint into torch.optim.AdamW(amsgrad=True)"]),
        (lambda ps: torch.optim.Adam(ps, weight_decay=0.1), ["coupled", "weight_decay=0"]),
        (lambda ps: torch.optim.NAdam(ps), ["no 'amsgrad'", "optimizer that saved it"]),
        (lambda ps: torch.optim.Adamax(ps), ["no 'amsgrad'", "optimizer that saved it"]),
    ],
    ids=["AdamW-amsgrad", "Adam-coupled-decay", "NAdam", "Adamax"],
)
def test_a_state_dict_of_an_update_gefen_does_not_make_is_refused(make, needles):
    """Groups that mean another update than Gefen's are refused at load as the constructor
    refuses them, before anything is loaded: none runs silently as plain Gefen."""
    params = make_params()
    other = make(params)
    run(other, params, 1)
    fresh = Gefen(clone_params(params))
    with raises_naming((ValueError, NotImplementedError), "saved param group 0", *needles):
        fresh.load_state_dict(other.state_dict())
    assert not fresh.state and fresh.param_groups[0]["amsgrad"] is False


def test_adams_state_dict_without_weight_decay_loads_and_a_coupled_group_is_refused():
    params = make_params()
    adam = torch.optim.Adam(params)
    run(adam, params, 2)
    fresh = Gefen(clone_params(params))
    fresh.load_state_dict(adam.state_dict())
    assert {"codes", "magnitude", "vmean"} <= set(fresh.state[all_params(fresh)[0]])
    with raises_naming(ValueError, "param group 0", "coupled", "decoupled_weight_decay=True"):
        Gefen([{"params": make_params(), "decoupled_weight_decay": False}], weight_decay=0.1)


@pytest.mark.parametrize("source", ["AdamW", "Gefen", "Muon", "GefenMuon"])
def test_load_state_dict_hooks_run_once_and_the_post_hook_sees_the_loaded_state(source):
    """As for torch.optim: each pre-hook once, on the state_dict given; each post-hook once,
    after the load (a migrated AdamW or Muon checkpoint included)."""
    muon = "Muon" in source
    params = make_params(shapes=[(8, 16), (16, 4)]) if muon else make_params()
    saver = {"AdamW": torch.optim.AdamW, "Gefen": Gefen, "Muon": torch.optim.Muon,
             "GefenMuon": GefenMuon}[source](params, lr=0.01)
    run(saver, params, 2)
    loader = (GefenMuon if muon else Gefen)(clone_params(params), lr=0.01)
    calls = []

    def pre(optimizer, state_dict):
        calls.append("pre")
        state_dict = dict(state_dict, param_groups=[dict(g) for g in state_dict["param_groups"]])
        state_dict["param_groups"][0]["lr"] /= 2
        return state_dict

    def post(optimizer):
        calls.append(("post", sorted(optimizer.state[all_params(optimizer)[0]])))

    loader.register_load_state_dict_pre_hook(pre)
    loader.register_load_state_dict_post_hook(post)
    loader.load_state_dict(saver.state_dict())
    first = sorted(loader.state[all_params(loader)[0]])
    assert calls == ["pre", ("post", first)]
    assert "codes" in first and "exp_avg" not in first and "momentum_buffer" not in first
    assert loader.param_groups[0]["lr"] == 0.005


@pytest.mark.parametrize("kind", ["Gefen", "GefenMuon"])
def test_state_dict_post_hooks_see_the_state_dict_returned(kind):
    """As on AdamW, a post-hook gets the state_dict that state_dict() returns (an asynchronous
    checkpointer keeps it), and what it returns is returned."""
    muon = kind == "GefenMuon"
    params = make_params(shapes=[(8, 16), (16, 4)]) if muon else make_params()
    opt = (GefenMuon if muon else Gefen)(params, lr=0.01)
    run(opt, params, 2)
    seen = []

    def keep(optimizer, state_dict):
        seen.append(state_dict)

    def tag(optimizer, state_dict):
        return {**state_dict, "tag": sorted(state_dict)}

    opt.register_state_dict_post_hook(keep)
    opt.register_state_dict_post_hook(tag)
    returned = opt.state_dict()
    assert returned["tag"] == sorted(seen[0]) and {"codebook", "variant"} <= set(seen[0])
    fresh = (GefenMuon if muon else Gefen)(clone_params(params), lr=0.01)
    fresh.load_state_dict(seen[0])  # loads: the codebook and the saved layout are in it


# --------------------------------------------------------------------------------------------
# deepcopy and pickle


def pickle_round_trip(obj):
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("copier", [copy.deepcopy, pickle_round_trip], ids=["deepcopy", "pickle"])
def test_copied_optimizer_keeps_state_and_continues_identically(copier):
    params = make_params()
    opt = Gefen(params, lr=1e-2)
    run(opt, params, 3)
    copied = copier(opt)
    copied_params = all_params(copied)
    assert len(copied_params) == len(params)
    assert all(c is not p and torch.equal(c, p) for c, p in zip(copied_params, params))
    public = lambda o: {k for k in vars(o) if not k.startswith("_")}  # noqa: E731
    assert public(copied) == public(opt)
    assert torch.equal(copied.codebook, opt.codebook)
    assert_tree_equal(copied.param_groups[0]["lr"], opt.param_groups[0]["lr"])
    assert_tree_equal(snapshot(copied, copied_params), snapshot(opt, params))
    for c, p in zip(copied_params, params):
        assert copied.state[c]["codes"].data_ptr() != opt.state[p]["codes"].data_ptr()

    run(opt, params, 3, start=3)
    run(copied, copied_params, 3, start=3)
    assert_all_equal(copied_params, params)
    assert_tree_equal(snapshot(copied, copied_params), snapshot(opt, params))


# --------------------------------------------------------------------------------------------
# repr


def test_repr_matches_adamw():
    a, b = make_params(), make_params()
    kwargs = dict(lr=3e-4, weight_decay=0.1)
    gefen = Gefen([{"params": a[:2]}, {"params": a[2:], "lr": 1e-2}], **kwargs)
    adamw = torch.optim.AdamW([{"params": b[:2]}, {"params": b[2:], "lr": 1e-2}], **kwargs)
    text = repr(gefen)
    assert text.startswith("Gefen (")
    assert "Parameter Group 1" in text and "    lr: 0.01" in text
    assert text == repr(adamw).replace("AdamW (", "Gefen (", 1)


# --------------------------------------------------------------------------------------------
# error inputs


# AdamW's error type and wording first (code written against AdamW matches it), Gefen's fix after.
HYPERPARAMETER_ERRORS = [
    ({"amsgrad": True}, NotImplementedError, ["amsgrad=True", "amsgrad=False"]),
    ({"differentiable": True}, NotImplementedError, ["differentiable=True", "AdamW"]),
    ({"lr": -1e-3}, ValueError, ["Invalid learning rate: -0.001", "lr >= 0"]),
    ({"lr": float("nan")}, ValueError, ["Invalid learning rate: nan", "lr >= 0"]),
    ({"eps": -1e-8}, ValueError, ["Invalid epsilon value: -1e-08", "eps >= 0"]),
    ({"weight_decay": -0.1}, ValueError, ["Invalid weight_decay value: -0.1", "weight_decay >= 0"]),
    ({"weight_decay": -1}, ValueError, ["Invalid weight_decay value: -1 ("]),
    ({"betas": (1.0, 0.999)}, ValueError, ["Invalid beta parameter at index 0: 1.0", "0 <= beta < 1"]),
    ({"betas": (-0.1, 0.999)}, ValueError, ["Invalid beta parameter at index 0: -0.1", "0 <= beta"]),
    ({"betas": (0.9, 1.0)}, ValueError, ["Invalid beta parameter at index 1: 1.0", "0 <= beta < 1"]),
    ({"betas": (0.9,)}, ValueError, ["betas must be a pair (beta1, beta2), got (0.9,)", "two floats"]),
    ({"betas": 0.9}, ValueError, ["betas must be a pair (beta1, beta2), got 0.9", "any sequence"]),
    ({"betas": ("0.9", 0.99)}, TypeError,
     ["betas[0] must be a float or a one-element tensor, got str '0.9'"]),
    ({"lr": torch.tensor([1e-3, 1e-3])}, ValueError, ["Tensor lr must be 1-element", "(2,)"]),
    ({"betas": (torch.tensor([0.9, 0.9]), torch.tensor(0.99))}, ValueError,
     ["Tensor betas[0] must be 1-element", "(2,)"]),
    ({"betas": (0.9, torch.tensor(0.99))}, ValueError,
     ["betas must be either both floats or both Tensors", "float and Tensor"]),
    ({"betas": (torch.tensor(0.9), 0.99)}, ValueError,
     ["betas must be either both floats or both Tensors", "Tensor and float"]),
    ({"lr": torch.tensor(1e-3), "foreach": True}, ValueError,
     ["lr as a Tensor is not supported for capturable=False and foreach=True", "capturable=True"]),
    ({"betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True}, ValueError,
     ["betas[0] as a Tensor is not supported for capturable=False and foreach=True"]),
]


@pytest.mark.parametrize(
    "kwargs, exc_type, needles",
    HYPERPARAMETER_ERRORS,
    ids=[repr(k).replace(" ", "") for k, _, _ in HYPERPARAMETER_ERRORS],
)
@pytest.mark.parametrize("where", ["constructor", "add_param_group"])
def test_invalid_hyperparameters_raise_with_a_fix(kwargs, exc_type, needles, where):
    params = make_params()
    if where == "constructor":
        with raises_naming(exc_type, *needles) as info:
            Gefen(params, **kwargs)
        if exc_type is ValueError:  # AdamW's wording starts the message
            assert str(info.value).startswith(needles[0]), str(info.value)
    else:
        opt = Gefen(params[:2])
        with raises_naming(exc_type, "param group 1", *needles):
            opt.add_param_group({"params": params[2:], **kwargs})
        assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "dtype, fix",
    [
        (torch.int64, "leave this tensor out"),
        (torch.int32, "leave this tensor out"),
        (torch.uint8, "leave this tensor out"),
        (torch.bool, "leave this tensor out"),
        (torch.complex64, "view_as_real"),
        (torch.complex128, "view_as_real"),
    ],
    ids=str,
)
def test_non_real_floating_parameters_rejected_at_construction(dtype, fix):
    params = make_params()[:1] + [torch.zeros(3, dtype=dtype)]
    with raises_naming(TypeError, "parameter 1 of param group 0", str(dtype), fix) as info:
        Gefen(params)
    assert ("view_as_real" in str(info.value)) == dtype.is_complex  # only the fix that holds


@pytest.mark.parametrize(
    "params, exc_type, message",
    [
        (lambda ps: ps[0], TypeError, "iterable of Tensors or dicts"),
        (lambda ps: [], ValueError, "empty parameter list"),
        (lambda ps: [{"params": ps[0]}, {"params": ps[0]}], ValueError, "more than one"),
    ],
    ids=["bare-tensor", "empty", "duplicate-across-groups"],
)
def test_generic_constructor_errors(params, exc_type, message):
    with raises_naming(exc_type, message):
        Gefen(params(make_params()))


@pytest.mark.parametrize("cls", [Gefen, GefenMuon], ids=["Gefen", "GefenMuon"])
@pytest.mark.parametrize("where", ["constructor", "add_param_group"])
def test_a_set_of_parameters_in_a_group_is_refused_as_torch_refuses_it(cls, where):
    """A set's order follows id() hashes: checkpoint indices would reach other parameters on
    resume. torch.optim refuses it in a group; so does each Gefen optimizer, by name."""
    params = [nn.Parameter(torch.randn(4, 4)) for _ in range(3)]
    with pytest.raises(TypeError, match="set"):
        torch.optim.AdamW([{"params": set(params)}])
    with raises_naming(TypeError, cls.__name__, "param group", "in a set", "in a list"):
        if where == "constructor":
            cls([{"params": set(params)}])
        else:
            cls([nn.Parameter(torch.randn(4, 4))]).add_param_group({"params": set(params)})


def test_sparse_gradient_raises_and_updates_nothing():
    torch.manual_seed(0)
    linear, embedding = nn.Linear(4, 1), nn.Embedding(10, 4, sparse=True)
    params = [linear.weight, linear.bias, embedding.weight]
    opt = Gefen(params)
    linear(embedding(torch.tensor([1, 2, 3]))).sum().backward()
    assert embedding.weight.grad.is_sparse
    before = values(params)
    with raises_naming(RuntimeError, "sparse", "parameter 2 of param group 0", "SparseAdam"):
        opt.step()
    assert_all_equal(params, before)
    assert not opt.state and opt.codebook is None


def test_complex_gradient_raises_at_step():
    params = make_params()[:1]
    opt = Gefen(params)
    # A complex tensor that reached the optimizer after construction (param_groups edited).
    z = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    opt.param_groups[0]["params"].append(z)
    set_grads(params, 0)
    z.grad = torch.randn(4, dtype=torch.complex64)
    before = values(params)
    with raises_naming(RuntimeError, "complex", "parameter 1 of param group 0", "view_as_real"):
        opt.step()
    assert_all_equal(params, before)
    assert not opt.state


@pytest.mark.parametrize("optimizer", [Gefen, GefenMuon])
def test_a_wrapper_subclass_parameter_is_refused_by_name(optimizer):
    """A tensor subclass that wraps other tensors (torch's TwoTensor) has no memory of its own
    for the kernels: refused by name with what to do, before anything changes."""
    from torch.testing._internal.two_tensor import TwoTensor

    values = torch.randn(16, 32)
    p = nn.Parameter(TwoTensor(values.clone(), values.clone()))
    opt = optimizer([p], lr=0.1)
    p.grad = TwoTensor(torch.ones(16, 32), torch.ones(16, 32))
    with raises_naming(TypeError, "parameter 0 of param group 0 is a TwoTensor",
                       "another optimizer"):
        opt.step()
    assert torch.equal(p.detach().a, values) and not opt.state


@pytest.mark.parametrize("when", ["first step", "later step"])
def test_a_gradient_of_another_dtype_is_refused_by_name_before_any_state(when):
    """p.grad_dtype = None lets a gradient differ from its parameter's dtype; Gefen's state
    lives in the gradient's dtype, so it refuses one, before building or changing state, and
    steps again once the gradient is fixed."""
    params = make_params()
    opt = Gefen(params)
    if when == "later step":
        set_grads(params, 0)
        opt.step()
    before, state = values(params), snapshot(opt, params)
    set_grads(params, 1)
    params[1].grad_dtype = None
    params[1].grad = params[1].grad.bfloat16()
    with raises_naming(ValueError, "parameter 1 of param group 0", "torch.bfloat16",
                       "grad_dtype"):
        opt.step()
    assert_all_equal(params, before)
    assert_tree_equal(snapshot(opt, params), state)
    assert (opt.codebook is None) == (when == "first step")
    set_grads(params, 2)
    opt.step()
    assert all(opt.state[p] for p in params)


def test_a_step_refused_for_one_bucket_steps_no_other():
    """Parameters of two dtypes step in two buckets; a gradient refused in either leaves
    both untouched (every bucket is checked before any kernel runs)."""
    params = make_params() + make_params(torch.bfloat16, seed=1)
    opt = Gefen(params)
    set_grads(params, 0)
    opt.step()
    assert len(opt._buckets) == 2
    for bad in (0, len(params) - 1):  # in the first bucket, then in the last
        before, state = values(params), snapshot(opt, params)
        set_grads(params, 1)
        params[bad].grad_dtype = None
        params[bad].grad = params[bad].grad.double()
        with raises_naming(ValueError, f"parameter {bad} of param group 0", "torch.float64"):
            opt.step()
        assert_all_equal(params, before)
        assert_tree_equal(snapshot(opt, params), state)
        params[bad].grad = None
        params[bad].grad_dtype = params[bad].dtype


@pytest.mark.parametrize("bad, dtype", [
    (float("inf"), torch.float32), (float("-inf"), torch.float32), (float("nan"), torch.float32),
    # finite in float64 but not in fp32, where the codebook's histogram normalises (the C
    # histogram once wrote out of bounds on it)
    (1e39, torch.float64), (-1e39, torch.float64),
])
@pytest.mark.parametrize("when", ["first step", "late parameter"])
def test_non_finite_first_gradient_raises_and_can_be_skipped(bad, dtype, when):
    params = make_params(dtype)
    opt = Gefen(params)
    if when == "late parameter":
        set_grads(params, 0, only={0, 2, 3})
        opt.step()
    codebook = None if opt.codebook is None else opt.codebook.clone()
    before, state = values(params), snapshot(opt, params)
    set_grads(params, 1)
    params[1].grad[3] = bad
    with raises_naming(ValueError, "inf or nan", "parameter 1 of param group 0", "step() again"):
        opt.step()
    assert_all_equal(params, before)
    assert_tree_equal(snapshot(opt, params), state)
    assert (opt.codebook is None) if codebook is None else torch.equal(opt.codebook, codebook)
    # Skipping the step (as GradScaler does) and retrying with finite gradients works.
    set_grads(params, 2)
    opt.step()
    assert all(opt.state[p] for p in params)
    assert all(torch.isfinite(p).all() for p in params)


def test_a_later_nan_gradient_element_nans_the_elements_sharing_its_second_moment():
    """As the README says: AdamW loses the one element; Gefen, in a tensor of period P, the P
    elements of its block (their shared vmean), and no other."""
    gen = torch.Generator().manual_seed(1)
    weight = nn.Parameter(torch.randn(16, 9, generator=gen))
    opt = Gefen([weight], lr=1e-2)
    for step in range(4):
        weight.grad = torch.randn(16, 9, generator=gen)
        if step == 2:
            weight.grad[3, 5] = float("nan")
        opt.step()
    assert opt.state[weight]["period"] == 9
    lost = torch.zeros(16, 9, dtype=torch.bool)
    lost[3] = True
    assert torch.equal(weight.isnan(), lost)


# --------------------------------------------------------------------------------------------
# maximize


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_maximize_equals_minimizing_the_negated_loss(weight_decay):
    up, down = make_params(), make_params()
    opt_up = Gefen(up, lr=1e-2, weight_decay=weight_decay, maximize=True)
    opt_down = Gefen(down, lr=1e-2, weight_decay=weight_decay, maximize=False)
    start = values(up)
    run(opt_up, up, 4, sign=1.0)
    run(opt_down, down, 4, sign=-1.0)
    assert_all_equal(up, down)
    assert torch.equal(opt_up.codebook, opt_down.codebook)
    assert_tree_equal(snapshot(opt_up, up), snapshot(opt_down, down))
    assert all(not torch.equal(p, s) for p, s in zip(up, start))


@pytest.mark.parametrize("value", [
    1, np.bool_(True), torch.tensor(True), "1", None, "yes", "0", "",
], ids=repr)
def test_maximize_is_read_for_its_truth_as_adamw_reads_it(value):
    given, plain = make_params(), make_params()
    opt = Gefen(given, lr=1e-2, maximize=value)
    run(opt, given, 3)
    run(Gefen(plain, lr=1e-2, maximize=bool(value)), plain, 3)
    assert_all_equal(given, plain)
    assert opt.param_groups[0]["maximize"] is value  # stored as given, as AdamW stores it


# --------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtypes", [[d] for d in FLOAT_DTYPES] + [list(FLOAT_DTYPES)],
                         ids=[str(d) for d in FLOAT_DTYPES] + ["mixed"])
def test_floating_dtypes_step_keep_dtype_and_state_dtype(dtypes):
    dtype_of = [dtypes[i % len(dtypes)] for i in range(len(SHAPES))]
    params = [nn.Parameter(p.to(d)) for p, d in zip(make_params(torch.float32), dtype_of)]
    opt = Gefen(params, lr=0.05, weight_decay=0.0)
    start_loss = quadratic(params).item()
    for _ in range(5):
        opt.zero_grad()
        quadratic(params).backward()
        opt.step()
    for p, dtype in zip(params, dtype_of):
        assert p.dtype == dtype and p.grad.dtype == dtype
        assert torch.isfinite(p).all()
        state = opt.state[p]
        assert state["codes"].dtype == torch.uint8
        assert state["magnitude"].dtype == state["vmean"].dtype == dtype
    assert opt.codebook.dtype == torch.float32
    assert quadratic(params).item() < start_loss


def test_float16_parameters_warn_once_that_their_second_moments_underflow():
    """The state dtype is the gradient's (GEFEN_SPEC), so a float16 parameter's second moment
    is stored in float16, where (1 - beta2) * g^2 is 0 for gradients of 1e-2: such an element
    then steps by lr * |m| / eps, hundreds of times lr, as torch's AdamW with float16 moments
    fails too. The step says so, naming the parameter and the fix, once, when the state is made;
    float32 and bfloat16 parameters step without a warning."""
    torch.manual_seed(0)
    half = nn.Parameter(torch.zeros(64, 32, dtype=torch.float16))
    others = [nn.Parameter(torch.zeros(64, 32, dtype=d)) for d in (torch.float32, torch.bfloat16)]
    opt = Gefen([others[0], half, others[1]], lr=1e-3, weight_decay=0.0)
    for p in (half, *others):
        p.grad = (torch.randn(64, 32) * 1e-2).to(p.dtype)
    with pytest.warns(UserWarning, match=r"parameter 1 of param group 0 is float16.*second "
                                         r"moments.*autocast.*bfloat16") as caught:
        opt.step()
    assert len(caught) == 1
    assert opt.state[half]["vmean"].min() == 0  # the hazard named: underflowed to zero
    assert half.abs().max() > 100 * 1e-3 > others[0].abs().max() / 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once: the state exists
        quiet = Gefen(others, lr=1e-3)
        quiet.step()


def test_zero_element_parameter_is_stepped_like_adamw():
    """AdamW accepts a parameter with no elements (nn.Linear(0, k).weight, say); so must a
    drop-in replacement, without changing what the other parameters do."""
    with_empty = make_params()[:2] + [nn.Parameter(torch.empty(0, 4))]
    without = make_params()[:2]
    opt_with, opt_without = Gefen(with_empty), Gefen(without)
    run(opt_with, with_empty, 2)
    run(opt_without, without, 2)
    assert_all_equal(with_empty[:2], without)
    assert with_empty[2].shape == (0, 4)


@pytest.mark.parametrize("name", ["Gefen", "GefenMuon"])
def test_another_default_device_changes_nothing(name):
    """torch.set_default_device (some scripts set "cuda") leaves the tables the optimizer builds
    on the host where they belong: AdamW's state taken over, first steps, steady steps (one
    with a transposed gradient, which takes the general path) and a state_dict round trip give
    the same parameters as without it (the meta device stands in, CPU parameters)."""
    import gefen_compile

    def run(default):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cpu"))
                  for s in [(8, 16), (32, 8), (4, 40)]]
        adamw = torch.optim.AdamW(params, lr=0.01)
        for p in params:
            p.grad = torch.randn(p.shape, device="cpu")
        adamw.step()
        opt = getattr(gefen_compile, name)(params, lr=0.01)
        torch.set_default_device(default)
        try:
            if name == "Gefen":
                opt.load_state_dict(adamw.state_dict())
            for i in range(4):
                gen = torch.Generator().manual_seed(i)
                for p in params:
                    p.grad = torch.randn(p.shape, device="cpu", generator=gen)
                if i == 3:
                    params[0].grad = params[0].grad.T.contiguous().T
                opt.step()
            opt.load_state_dict(opt.state_dict())
            opt.step()
        finally:
            # None, not "cpu": a default device, even the CPU, is a torch function mode that
            # stays on for every later test (torch.compile's graphs among them)
            torch.set_default_device(None)
        return params

    assert all(map(torch.equal, run(None), run("meta")))


def test_a_default_device_set_before_the_import_changes_nothing():
    """The package's own host constants are made on the host whatever the default device was
    when it was imported."""
    code = textwrap.dedent("""
        import torch
        torch.set_default_device("meta")
        import gefen_compile
        torch.set_default_device("cpu")
        params = [torch.nn.Parameter(torch.randn(8, 16))]
        params[0].grad = torch.randn(8, 16)
        gefen_compile.Gefen(params).step()
        print("stepped")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0 and run.stdout.strip() == "stepped", run.stderr[-2000:]
