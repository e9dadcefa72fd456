"""Gefen checkpoints met by a plain torch.optim.AdamW, and gefen_compile.adamw_state_dict, the
way back to AdamW."""

import copy
import io

import pytest
import torch

import gefen_compile as gefen
from gefen_compile import Gefen, GefenMuon, adamw_state_dict

SHAPES = ((16, 12), (12,), (3, 4), ())
LR, BETAS, EPS, WD = 1e-2, (0.8, 0.99), 1e-8, 0.05


def make_params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def set_grads(params, step):
    for i, p in enumerate(params):
        gen = torch.Generator().manual_seed(97 * step + i)
        g = torch.randn(p.shape, generator=gen)
        if p.dim() > 1:  # rows of different scales: period > 1
            g = g * torch.exp(2 * torch.randn(p.shape[0], 1, generator=gen))
        p.grad = g.to(p.dtype)


def stepped_gefen(dtype=torch.float32, steps=3):
    params = make_params(dtype)
    opt = Gefen(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for k in range(steps):
        set_grads(params, k)
        opt.step()
    return params, opt


def saved_and_loaded(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only, torch's default


@pytest.mark.parametrize("transport", ["in-memory", "torch.save"])
@pytest.mark.parametrize("made_by", ["Gefen", "patched AdamW"])
def test_plain_adamw_refuses_a_gefen_checkpoint_at_load_naming_the_fix(transport, made_by,
                                                                       no_conversion_at_load):
    params, opt = stepped_gefen()
    if made_by == "patched AdamW":
        with gefen.patched_adamw():
            opt = torch.optim.AdamW(params)
        set_grads(params, 0)
        opt.step()
    state_dict = opt.state_dict()
    if transport == "torch.save":
        state_dict = saved_and_loaded(state_dict)
    adamw = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params])
    with pytest.raises(ValueError, match=r"gefen_compile\.adamw_state_dict\(state_dict\)"):
        adamw.load_state_dict(state_dict)


def slow_adamw_moments(entry, codebook):
    """GEFEN_SPEC's first and second moments of one saved entry, element by element."""
    codes = entry["codes"].reshape(-1).tolist()
    magnitude, vmean = entry["magnitude"].double().tolist(), entry["vmean"].double().tolist()
    n, period = len(codes), entry["period"]
    block = period if period > 1 else max(d for d in range(1, 257) if n % d == 0)
    exp_avg = [float(codebook[codes[i]]) * magnitude[i // block] for i in range(n)]
    exp_avg_sq = [vmean[i // period] for i in range(n)]  # period 1: one per element
    return torch.tensor(exp_avg, dtype=torch.float64), torch.tensor(exp_avg_sq, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("source", ["optimizer", "state_dict via torch.save"])
def test_adamw_state_dict_dequantises_as_the_spec_says(dtype, source):
    params, opt = stepped_gefen(dtype)
    saved = opt.state_dict()
    result = adamw_state_dict(opt if source == "optimizer" else saved_and_loaded(saved))
    assert result.keys() == {"state", "param_groups"}
    assert result["param_groups"] == saved["param_groups"]
    periods = set()
    for i, p in enumerate(params):
        entry, live = result["state"][i], opt.state[p]
        assert entry.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert entry["step"].dtype == torch.float32 and entry["step"].device.type == "cpu"
        assert float(entry["step"]) == 3
        exp_avg, exp_avg_sq = slow_adamw_moments(live, opt.codebook)
        for key, expected in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            assert entry[key].shape == p.shape and entry[key].dtype == dtype, key
            torch.testing.assert_close(entry[key].double().reshape(-1),
                                       expected.to(dtype).double(), rtol=0, atol=0)
        periods.add(live["period"])
    assert max(periods) > 1 and 1 in periods


def test_adamw_continues_from_adamw_state_dict():
    params, opt = stepped_gefen()
    state = adamw_state_dict(saved_and_loaded(opt.state_dict()))
    adamw_params = [p.detach().clone().requires_grad_() for p in params]
    adamw = torch.optim.AdamW(adamw_params)
    adamw.load_state_dict(copy.deepcopy(state))  # AdamW steps the loaded tensors in place
    assert adamw.param_groups[0]["lr"] == LR and adamw.param_groups[0]["betas"] == BETAS
    set_grads(adamw_params, 3)
    before = [p.detach().clone() for p in adamw_params]
    adamw.step()
    b1, b2 = BETAS
    for i, (p, p0) in enumerate(zip(adamw_params, before)):
        s = state["state"][i]
        g = p.grad
        m = b1 * s["exp_avg"] + (1 - b1) * g
        v = b2 * s["exp_avg_sq"] + (1 - b2) * g * g
        t = 4  # three Gefen steps, then this one
        expected = p0 * (1 - LR * WD) - LR / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + EPS)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
        assert float(adamw.state[p]["step"]) == t


def test_gefen_loads_a_checkpoint_in_the_layout_before_the_marker():
    # Earlier checkpoints: the step counter under "step", codes flat.
    params, opt = stepped_gefen()
    old = opt.state_dict()
    old["state"] = {k: {**{key: v for key, v in e.items() if key != "gefen_step"},
                        "step": e["gefen_step"], "codes": e["codes"].reshape(-1)}
                    for k, e in old["state"].items()}
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = Gefen(twin_params)
    twin.load_state_dict(saved_and_loaded(old))
    for k in range(3, 5):
        set_grads(params, k)
        set_grads(twin_params, k)
        opt.step()
        twin.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))


def test_adamw_state_dict_refuses_what_is_not_gefen_state():
    with pytest.raises(TypeError, match="Gefen optimizer or its state_dict"):
        adamw_state_dict([1, 2])
    params, opt = stepped_gefen()
    state_dict = opt.state_dict()
    del state_dict["codebook"]
    with pytest.raises(ValueError, match="no 'codebook'"):
        adamw_state_dict(state_dict)
    weight = torch.nn.Parameter(torch.randn(16, 8))
    muon = GefenMuon([weight])
    weight.grad = torch.randn(16, 8)
    muon.step()
    for source in (muon, muon.state_dict()):  # a KeyError 'vmean' before
        with pytest.raises(TypeError, match="GefenMuon .* resume it with gefen_compile.GefenMuon"):
            adamw_state_dict(source)


def test_reading_the_state_of_a_parameter_without_state_keeps_state_dict_working():
    # optimizer.state is a defaultdict, as torch's: reading it for a parameter that has no
    # state yet (logging code does) leaves an empty entry, which AdamW saves as it is.
    params, opt = stepped_gefen()
    late = torch.nn.Parameter(torch.randn(6))
    opt.add_param_group({"params": [late]})
    assert opt.state[late] == {}
    state_dict = opt.state_dict()
    assert state_dict["state"][len(params)] == {}
    assert adamw_state_dict(state_dict)["state"][len(params)] == {}
    twin_params = [p.detach().clone().requires_grad_() for p in [*params, late]]
    twin = Gefen(twin_params[:-1])
    twin.add_param_group({"params": twin_params[-1:]})
    twin.load_state_dict(saved_and_loaded(state_dict))
    for k in range(3, 5):
        for ps, o in ((params + [late], opt), (twin_params, twin)):
            set_grads(ps, k)
            o.step()
    assert all(torch.equal(p, q) for p, q in zip([*params, late], twin_params))
    assert opt.state[late]["step"].item() == 2
