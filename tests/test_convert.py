"""convert(): an AdamW becomes Gefen in place, before its first step (nothing allocated) or after
(state migrated), keeping its identity for schedulers, hooks and compiled steps."""

import copy
import io
import logging
import pickle
import sys

import numpy as np
import pytest
import torch

from gefen_compile import Gefen, convert
from gefen_compile.convert import is_convertible
from reference import ref_nearest, ref_period


def model_params(seed=0):
    torch.manual_seed(seed)
    # Shapes with a clear period (rows of 48), a prime length and a 1-element tensor.
    return [torch.nn.Parameter(torch.randn(24, 48)), torch.nn.Parameter(torch.randn(37)),
            torch.nn.Parameter(torch.randn(1))]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        # Row-structured gradients, so the periods are not trivial.
        scale = torch.rand(p.shape[0], 1, generator=gen) * 10 if p.dim() == 2 else 1.0
        p.grad = torch.randn(p.shape, generator=gen) * scale


def adamw(params, **kwargs):
    groups = [{"params": params[:1]}, {"params": params[1:], "lr": 3e-3, "weight_decay": 0.0,
                                        "betas": (0.8, 0.99)}]
    return torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, **kwargs)


def tensor_bytes(optimizer):
    return sum(t.nbytes for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def test_convert_before_first_step_allocates_no_adamw_state_and_keeps_identity():
    params = model_params()
    opt = adamw(params)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    same = convert(opt)
    assert same is opt and isinstance(opt, torch.optim.AdamW) and isinstance(opt, Gefen)
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = Gefen([{"params": twin_params[:1]}, {"params": twin_params[1:], "lr": 3e-3,
                  "weight_decay": 0.0, "betas": (0.8, 0.99)}], lr=1e-2, weight_decay=0.1)
    twin_scheduler = torch.optim.lr_scheduler.StepLR(twin, step_size=1, gamma=0.5)
    for seed in range(4):
        set_grads(params, seed)
        set_grads(twin_params, seed)
        opt.step()
        twin.step()
        scheduler.step()
        twin_scheduler.step()
        for key in ("exp_avg", "exp_avg_sq"):
            assert all(key not in s for s in opt.state.values())
        for p, q in zip(params, twin_params):
            assert torch.equal(p, q)
    assert opt.param_groups[0]["lr"] == twin.param_groups[0]["lr"] == 1e-2 / 16
    assert tensor_bytes(opt) < 1.2 * sum(p.numel() for p in params) + 5 * 37 + 64


def test_closure_runs_before_the_update_and_its_loss_is_returned():
    params = model_params()
    opt = convert(adamw(params))
    before = [p.detach().clone() for p in params]

    def closure():
        set_grads(params, 7)
        return torch.tensor(1.5)

    assert opt.step(closure).item() == 1.5
    twin_params = [p.clone().requires_grad_() for p in before]
    twin = convert(adamw(twin_params))
    set_grads(twin_params, 7)
    twin.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


def test_hooks_registered_after_conversion_still_run_before_the_update():
    params = model_params()
    opt = convert(adamw(params))
    opt.register_step_pre_hook(lambda o, a, k: [p.grad.zero_() for p in params] and None)
    set_grads(params, 0)
    before = [p.detach().clone() for p in params]
    opt.step()
    # Zero gradients: only weight decay moved the parameters.
    assert torch.allclose(params[0], before[0] * (1 - 1e-2 * 0.1))
    assert torch.equal(params[1], before[1])


def stepped_adamw(steps=3):
    params = model_params()
    opt = adamw(params)
    for seed in range(steps):
        set_grads(params, seed)
        opt.step()
    return params, opt


def test_migrated_state_is_what_the_spec_makes_of_adamw_moments():
    params, opt = stepped_adamw()
    saved = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    convert(opt)
    codebook = opt.codebook.numpy()
    for p, old in zip(params, saved):
        state = opt.state[p]
        period = ref_period(old["exp_avg_sq"].sqrt())
        assert state["period"] == period
        # magnitude blocks of the robust default: the period, or 256 for period 1
        m = old["exp_avg"].reshape(-1, period if period > 1 else min(p.numel(), 256))
        magnitude = m.abs().amax(dim=1)
        assert torch.equal(state["magnitude"], magnitude)
        normalised = torch.where(magnitude[:, None] > 0, m / magnitude[:, None], -torch.inf)
        expected = ref_nearest(normalised.numpy().reshape(-1), codebook)
        np.testing.assert_array_equal(state["codes"].numpy(), expected)
        v = old["exp_avg_sq"].reshape(-1).double()
        vmean = v.view(-1, period).mean(dim=1) if period > 1 else v
        torch.testing.assert_close(state["vmean"].double(), vmean, rtol=1e-6, atol=0)
        assert state["step"].item() == 3.0 and state["codes"].dtype == torch.uint8


def step_together(opt, params, twin, twin_params, seeds):
    """Step both optimizers on the same gradients; parameters stay bit-identical."""
    for seed in seeds:
        set_grads(params, seed)
        set_grads(twin_params, seed)
        opt.step()
        twin.step()
        assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


def test_converted_optimizer_follows_eager_gefen_from_the_migrated_state():
    params, opt = stepped_adamw()
    convert(opt)
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = Gefen([{"params": twin_params[:1]}, {"params": twin_params[1:]}])
    twin.load_state_dict(opt.state_dict())
    step_together(opt, params, twin, twin_params, range(3, 8))


def test_adamw_checkpoint_loads_into_gefen_as_a_conversion():
    params, opt = stepped_adamw()
    checkpoint = copy.deepcopy(opt.state_dict())
    gefen_params = [p.detach().clone().requires_grad_() for p in params]
    gefen = Gefen([{"params": gefen_params[:1]}, {"params": gefen_params[1:]}])
    gefen.load_state_dict(checkpoint)
    convert(opt)
    assert gefen.param_groups[1]["lr"] == 3e-3 and gefen.param_groups[1]["betas"] == (0.8, 0.99)
    for a, b in zip(opt.state_dict()["state"].values(), gefen.state_dict()["state"].values()):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                   for k in a)
    step_together(opt, params, gefen, gefen_params, range(3, 6))


@pytest.mark.parametrize("moment", ["exp_avg", "exp_avg_sq"])
def test_an_adamw_checkpoint_with_moments_of_another_shape_is_refused_at_load(moment):
    """Migrated, they made codes of another size, which every later step refused."""
    params, opt = stepped_adamw()
    checkpoint = copy.deepcopy(opt.state_dict())
    checkpoint["state"][1][moment] = torch.zeros(3)
    gefen_params = [p.detach().clone().requires_grad_() for p in params]
    gefen = Gefen([{"params": gefen_params[:1]}, {"params": gefen_params[1:]}])
    with pytest.raises(ValueError, match=rf"saved {moment} of parameter 0 of param group 1 has "
                                         r"shape \(3,\)"):
        gefen.load_state_dict(checkpoint)
    assert not gefen.state


def test_converted_optimizer_pickles_with_its_update():
    params, opt = stepped_adamw()
    convert(opt)
    clone = pickle.loads(pickle.dumps(opt))
    set_grads(clone.param_groups[0]["params"] + clone.param_groups[1]["params"], 9)
    before = [p.detach().clone() for g in clone.param_groups for p in g["params"]]
    clone.step()
    after = [p for g in clone.param_groups for p in g["params"]]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert clone.state[after[0]]["step"].item() == 4.0


class MyAdamW(torch.optim.AdamW):
    """A user's subclass: its converted class (GefenMyAdamW) is made at its conversion."""


class MyStepAdamW(torch.optim.AdamW):
    def step(self, closure=None):  # reaches AdamW's step, where Gefen's update then runs
        return super().step(closure)


@pytest.mark.parametrize("cls", [MyAdamW, MyStepAdamW])
def test_converted_subclass_pickles_to_an_equivalent_optimizer(cls, monkeypatch):
    params = model_params()
    opt = convert(cls([{"params": params[:1]}, {"params": params[1:], "lr": 3e-3}], lr=1e-2))
    for seed in range(2):
        set_grads(params, seed)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    # As in a fresh process, where no converted class of the subclass exists yet.
    monkeypatch.delitem(sys.modules["gefen_compile.convert"]._CONVERTED, cls)
    clone = torch.load(buffer, weights_only=False)
    assert type(clone) is not type(opt) and type(clone).__name__ == f"Gefen{cls.__name__}"
    assert isinstance(clone, cls) and isinstance(clone, Gefen) and clone.variant == opt.variant
    assert torch.equal(clone.codebook, opt.codebook)
    clone_params = [p for g in clone.param_groups for p in g["params"]]
    step_together(opt, params, clone, clone_params, range(2, 5))
    assert clone.state[clone_params[0]]["step"].item() == 5.0


def test_conversion_logs_one_info_line(caplog):
    params, opt = stepped_adamw()
    with caplog.at_level(logging.INFO, logger="gefen_compile"):
        convert(opt)
        convert(opt)  # already Gefen: nothing to say
    lines = [r.getMessage() for r in caplog.records if r.name == "gefen_compile"]
    assert len(lines) == 1
    assert "torch.optim.adamw.AdamW" in lines[0] and "3 tensors" in lines[0]
    assert "->" in lines[0]


@pytest.mark.parametrize("make, error, words", [
    (lambda p: torch.optim.SGD(p, lr=0.1), TypeError, ("SGD", "gefen_compile.Gefen")),
    (lambda p: torch.optim.Adam(p, weight_decay=0.1), ValueError, ("weight_decay", "AdamW")),
    (lambda p: torch.optim.AdamW(p, amsgrad=True), NotImplementedError, ("amsgrad",)),
])
def test_unconvertible_optimizers_are_refused_with_the_fix(make, error, words):
    opt = make(model_params())
    kind = type(opt)
    with pytest.raises(error) as info:
        convert(opt)
    assert all(w in str(info.value) for w in words)
    assert type(opt) is kind  # nothing changed


def test_adam_without_weight_decay_converts():
    opt = convert(torch.optim.Adam(model_params(), lr=1e-3))
    assert isinstance(opt, torch.optim.Adam) and isinstance(opt, Gefen)


def test_is_convertible_takes_the_exact_classes_only_also_after_a_subclass_converted():
    # convert() takes a user's subclass; the backend's and the load's test must not start
    # taking that subclass once its converted class exists.
    class MyAdamW(torch.optim.AdamW):
        pass

    def subclass():
        return MyAdamW([torch.nn.Parameter(torch.randn(4, 4))])

    assert is_convertible(torch.optim.AdamW([torch.nn.Parameter(torch.randn(4, 4))]))
    assert not is_convertible(subclass())
    convert(subclass())
    assert not is_convertible(subclass())
    assert not is_convertible(torch.optim.AdamW([torch.nn.Parameter(torch.randn(4, 4))],
                                                amsgrad=True))
