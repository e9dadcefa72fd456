"""The steady-state step's checks: what the kernels rely on is verified per step (cheaply), and
the eager fast path keeps autograd's in-place bookkeeping."""

import pytest
import torch

from gefen_compile import Gefen


def stepped(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).to(dtype)
    opt = Gefen(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8, dtype=dtype)).sum().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_model_cast_after_the_first_step_is_refused_by_name(dtype):
    model, opt = stepped()
    model.to(dtype)
    model(torch.randn(3, 8, dtype=dtype)).sum().backward()
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 has dtype .* state was "
                                         r"built for torch.float32"):
        opt.step()


@pytest.mark.parametrize("numel", [0, 4, 400])  # 0: no memory, but first of all resized
def test_a_parameter_resized_after_the_first_step_is_refused(numel):
    model, opt = stepped()
    weight = model[0].weight
    weight.data = torch.zeros(numel)
    weight.grad = torch.ones(numel)
    with pytest.raises(ValueError, match="parameter 0 of param group 0 has dtype torch.float32 "
                                         f"and {numel} elements"):
        opt.step()


def test_state_dict_of_a_parameter_resized_after_its_first_step_names_it():
    # AdamW's moments save whatever their shape; Gefen's codes are saved in the parameter's.
    model, opt = stepped()
    model[1].weight.data = torch.zeros(8, 16)
    with pytest.raises(ValueError, match=r"Gefen.state_dict: parameter 2 of param group 0 has "
                                         r"128 elements, but its state was built for 64"):
        opt.state_dict()


def test_the_step_bumps_the_version_of_what_it_writes():
    """In-place writes are visible to autograd, as AdamW's are: a tensor saved for backward
    before the step is known to be stale after it."""
    model, opt = stepped()
    weight = model[0].weight
    before = weight._version
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert weight._version > before
    assert opt.state[weight]["codes"]._version > 0


def test_stateful_parameters_are_not_rescanned_and_late_ones_still_join():
    model, opt = stepped()
    late = torch.nn.Parameter(torch.randn(5, 7))
    opt.add_param_group({"params": [late]})
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert [p for _, _, _, p in opt._stateless] == [late]
    late.grad = torch.randn(5, 7)
    opt.step()
    assert "codes" in opt.state[late] and not opt._stateless


class OwnParameter(torch.nn.Parameter):
    """A Parameter subclass: the step reads it through method calls."""


@pytest.mark.parametrize("kind", [torch.nn.Parameter, OwnParameter])
def test_a_parameter_narrowed_in_place_is_refused_before_any_write(kind):
    """``p.data = storage[:k]`` keeps the data pointer but not the size: the step refuses it
    by name (the memory past the new end is not written), whichever way it reads tensors."""
    p = kind(torch.randn(64, 64))
    opt = Gefen([p])
    p.grad = torch.randn(64, 64)
    opt.step()
    storage = p.data
    p.grad = torch.randn(64, 64)
    p.data = storage[:16]
    tail = storage[16:].clone()
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 has shape \(64, 64\), "
                                         r"the parameter \(16, 64\)"):
        opt.step()
    assert torch.equal(storage[16:], tail)


def test_a_gradient_without_memory_is_refused_by_name():
    """A gradient whose data pointer is 0 (an efficient zero tensor; storage-less subclasses)
    is an error naming the parameter, not a read of address 0."""
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = Gefen([p])
    p.grad = torch.randn(8, 8)
    opt.step()
    p.grad = torch._efficientzerotensor(8, 8)
    assert p.grad.data_ptr() == 0
    with pytest.raises(ValueError, match="gradient of parameter 0 of param group 0 has no memory"):
        opt.step()



@pytest.mark.parametrize("key, value, error, message", [
    (("betas",), (1.0, 0.999), ValueError, r"Invalid beta parameter at index 0: 1.0 \(param group"),
    (("betas", 0), 1.0, ValueError, r"Invalid beta parameter at index 0: 1.0 \(param group"),
    (("amsgrad",), True, NotImplementedError, r"param group 1: amsgrad=True is not Gefen"),
    (("lr",), -1.0, ValueError, r"Invalid learning rate: -1.0 \(param group 1"),
    (("eps",), float("nan"), ValueError, r"Invalid epsilon value: nan \(param group 1"),
    (("decoupled_weight_decay",), False, ValueError, r"group 1 has weight_decay=0.01 applied as L2"),
], ids=["betas", "beta1_in_a_list", "amsgrad", "lr", "eps", "coupled_decay"])
def test_a_group_edited_between_steps_is_checked_as_built_changing_nothing(key, value, error,
                                                                           message):
    # AdamW's step fails on beta1 = 1 (a division by zero); Gefen's kernels would NaN every
    # parameter, and would ignore an option Gefen refuses.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = Gefen([{"params": model[0].parameters()},
                 {"params": model[1].parameters(), "betas": [0.9, 0.999]}], lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    for _ in range(3):  # a float lr that changes every step is checked, and passes
        model(torch.randn(3, 8)).sum().backward()
        opt.step()
        schedule.step()
    target = opt.param_groups[1]
    for k in key[:-1]:
        target = target[k]
    target[key[-1]] = value
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=message):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_edited_tensor_values_are_checked_without_host_reads(monkeypatch):
    # On a GPU each read of a tensor's value is a sync: a tensor lr set in place of another,
    # and OneCycleLR's betas (a float beta1 beside a tensor beta2), step without one. (64 x 64
    # elements: a first codebook that is not thin, which steps would learn again.)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = Gefen([p], lr=torch.tensor(1e-3), betas=(torch.tensor(0.9), torch.tensor(0.999)))
    p.grad = torch.randn(64, 64)
    opt.step()
    assert "codebook_histogram" not in opt.state_dict()
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    reads = []
    for name in ("__bool__", "__float__", "item"):
        def counted(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            reads.append(self)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    opt.param_groups[0]["lr"] = torch.tensor(2e-3)
    for _ in range(3):
        p.grad = torch.randn(64, 64)
        opt.step()
        schedule.step()
    assert reads == []
    assert [type(b) for b in opt.param_groups[0]["betas"]] == [float, torch.Tensor]
