"""The state Gefen's kernels read is checked before they read it: a loaded state_dict (codebook
and every entry against its parameter and period), state assigned into ``optimizer.state``
(used by the next step, or refused by name), and parameters on the meta device."""

from __future__ import annotations

import collections
import copy
import io

import pytest
import torch

import gefen_compile
from gefen_compile import checkpoint
from gefen_compile import Gefen


def model_and_opt(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).to(dtype)
    return model, Gefen(model.named_parameters(), lr=1e-2)


def train(model, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(5, 8, generator=gen).to(next(model.parameters()).dtype)
        model(x).square().sum().backward()
        opt.step()


def stepped(steps=2):
    model, opt = model_and_opt()
    train(model, opt, steps)
    return model, opt


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


# --------------------------------------------------------------------------------------------
# load_state_dict validates before it replaces anything


def saved():
    _, opt = stepped()
    return opt.state_dict()


def bad_codebook(sd, value):
    sd["codebook"] = value


def crowd(codebook, i):
    """Entries i+1 and i+2 one and two ulps above entry i: sorted, in [-1, 1], and finite, but
    no lookup table separates the boundaries between them."""
    for k in (i + 1, i + 2):
        codebook[k] = torch.nextafter(codebook[k - 1], torch.tensor(2.0))


BAD_CODEBOOKS = {
    "short": (lambda sd: bad_codebook(sd, sd["codebook"][:255]), "shape (255,)"),
    "long": (lambda sd: bad_codebook(sd, torch.cat([sd["codebook"], sd["codebook"]])),
             "shape (512,)"),
    "integer": (lambda sd: bad_codebook(sd, sd["codebook"].long()), "torch.int64"),
    "unsorted": (lambda sd: bad_codebook(sd, sd["codebook"].flip(0)), "non-decreasing"),
    "nan": (lambda sd: bad_codebook(sd, torch.full((256,), float("nan"))), "finite"),
    "not a tensor": (lambda sd: bad_codebook(sd, [0.0] * 256), "not a tensor"),
    "entries too close": (lambda sd: crowd(sd["codebook"], 101), "closer than 2**-22"),
    # Steps then returned early, changing nothing, with nothing said.
    "none beside codes": (lambda sd: bad_codebook(sd, None), "is None while entries hold codes"),
}


@pytest.mark.parametrize("case", BAD_CODEBOOKS)
def test_a_bad_codebook_is_refused_at_load(case):
    sd = saved()
    spoil, needle = BAD_CODEBOOKS[case]
    spoil(sd)
    _, fresh = stepped()
    codebook, steps = fresh.codebook.clone(), [e["step"].item() for e in fresh.state.values()]
    with pytest.raises(ValueError, match="saved codebook") as info:
        fresh.load_state_dict(sd)
    assert needle in str(info.value)
    # Refused before anything was replaced.
    assert torch.equal(fresh.codebook, codebook)
    assert [e["step"].item() for e in fresh.state.values()] == steps


def entry(sd, i):
    return sd["state"][i]


BAD_ENTRIES = {
    "vmean too short": (lambda e: e.update(vmean=e["vmean"][:-1]), "vmean of shape"),
    "vmean too long": (lambda e: e.update(vmean=torch.cat([e["vmean"], e["vmean"]])), "vmean"),
    "vmean dtype": (lambda e: e.update(vmean=e["vmean"].to(torch.int32)), "torch.int32"),
    "magnitude length": (lambda e: e.update(magnitude=torch.cat([e["magnitude"]] * 2)),
                         "magnitude of shape"),
    "magnitude dtype": (lambda e: e.update(magnitude=e["magnitude"].long()), "torch.int64"),
    "codes dtype": (lambda e: e.update(codes=e["codes"].float()), "codes of shape"),
    "codes count": (lambda e: e.update(codes=e["codes"].reshape(-1)[:-1]), "codes"),
    "period": (lambda e: e.update(period=7), "period 7"),
    "period type": (lambda e: e.update(period=2.0), "period 2.0"),
    "missing key": (lambda e: e.pop("magnitude"), "has no 'magnitude'"),
    "step": (lambda e: e.update(gefen_step=torch.zeros(2)), "step"),
}


@pytest.mark.parametrize("case", BAD_ENTRIES)
def test_a_bad_entry_is_refused_at_load_by_name_and_nothing_is_replaced(case):
    sd = saved()
    spoil, needle = BAD_ENTRIES[case]
    spoil(entry(sd, 2))  # the second Linear's weight
    model, fresh = stepped()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"Gefen.load_state_dict: the saved state of parameter "
                                         r"2 of param group 0 \(1.weight\)") as info:
        fresh.load_state_dict(sd)
    assert needle in str(info.value) and "same order and shapes" in str(info.value)
    after = fresh.state_dict()
    for key, value in before["state"].items():
        for name, t in value.items():
            assert (torch.equal(t, after["state"][key][name]) if isinstance(t, torch.Tensor)
                    else t == after["state"][key][name])
    train(model, fresh, 1)  # the optimizer still steps with its own state


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_a_checkpoint_of_a_model_cast_since_loads_with_its_moments_cast_as_adamw_casts(dtype):
    """torch.optim.Optimizer.load_state_dict casts AdamW's moments to each parameter's dtype, so
    an fp32 checkpoint resumes a model cast to bf16 since; Gefen casts its floating state
    (magnitude, vmean) the same way and keeps its uint8 codes, periods and codebook."""
    adamw_model, _ = model_and_opt()
    adamw = torch.optim.AdamW(adamw_model.parameters(), lr=1e-2)
    train(adamw_model, adamw, 1)
    adamw_sd = adamw.state_dict()
    adamw_model.to(dtype)
    adamw = torch.optim.AdamW(adamw_model.parameters(), lr=1e-2)
    adamw.load_state_dict(adamw_sd)
    assert all(s["exp_avg"].dtype == dtype for s in adamw.state.values())  # the behaviour matched

    sd = saved()
    model, fresh = model_and_opt(dtype=dtype)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.codebook, sd["codebook"])
    for i, p in enumerate(model.parameters()):
        loaded, kept = fresh.state[p], sd["state"][i]
        assert loaded["period"] == kept["period"]
        assert loaded["codes"].dtype == torch.uint8
        assert torch.equal(loaded["codes"].reshape(-1), kept["codes"].reshape(-1))
        for key in ("magnitude", "vmean"):
            assert loaded[key].dtype == dtype and torch.equal(loaded[key], kept[key].to(dtype)), key
    before = [p.detach().clone() for p in model.parameters()]
    train(model, fresh, 2)
    assert all(p.isfinite().all() and not torch.equal(p, b)
               for p, b in zip(model.parameters(), before))
    assert [int(s["step"]) for s in fresh.state.values()] == [4] * 4


def test_a_model_cast_after_a_load_is_refused_with_the_cast_as_the_likely_cause():
    """After load_state_dict the state is checked when the next step builds its buckets; a
    model cast in between is refused by name, the error naming the cast first."""
    sd = saved()
    model, opt = model_and_opt()
    opt.load_state_dict(sd)
    model.to(torch.float64)
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 .*model\.to\(dtype\)"):
        train(model, opt, 1)


def test_valid_checkpoints_still_load_saved_and_flat_codes_and_through_torch_save():
    model, opt = stepped()
    sd = opt.state_dict()
    flat = copy.deepcopy(sd)
    for e in flat["state"].values():  # the older layout: flat codes
        e["codes"] = e["codes"].reshape(-1)
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=True)
    results = []
    for source in (sd, flat, reloaded):
        m, o = model_and_opt()
        m.load_state_dict(model.state_dict())
        o.load_state_dict(source)
        train(m, o, 2, seed=5)
        results.append(list(m.parameters()))
    assert_same(results[0], results[1])
    assert_same(results[0], results[2])


# --------------------------------------------------------------------------------------------
# state assigned into optimizer.state is used by the next step, or refused


def twins():
    (m1, o1), (m2, o2) = stepped(), stepped()
    return m1, o1, m2, o2


@pytest.mark.parametrize("key", ["vmean", "magnitude", "codes", "step"])
def test_a_tensor_assigned_into_the_state_is_used_by_the_next_step(key):
    """Assigning a new tensor equals writing the same values into the state in place."""
    m1, o1, m2, o2 = twins()
    w1, w2 = m1[1].weight, m2[1].weight
    old = o1.state[w1][key]
    new = {"vmean": old * 4, "magnitude": old * 0.5, "codes": old.flip(0),
           "step": old + 10}[key]
    o1.state[w1][key] = new.clone()
    o2.state[w2][key].copy_(new)
    train(m1, o1, 2, seed=9)
    train(m2, o2, 2, seed=9)
    assert_same(list(m1.parameters()), list(m2.parameters()))
    saved = "gefen_step" if key == "step" else key  # checkpoint.py's name for the counter
    assert torch.equal(o1.state_dict()["state"][2][saved], o2.state_dict()["state"][2][saved])


def test_a_replaced_entry_is_used_by_the_next_step():
    m1, o1, m2, o2 = twins()
    w1, w2 = m1[0].bias, m2[0].bias
    replacement = {k: (v * 2 if k == "vmean" else v.clone() if isinstance(v, torch.Tensor)
                       else v) for k, v in o1.state[w1].items()}
    o1.state[w1] = replacement
    o2.state[w2]["vmean"].mul_(2)
    train(m1, o1, 1, seed=3)
    train(m2, o2, 1, seed=3)
    assert_same(list(m1.parameters()), list(m2.parameters()))


def test_replacing_the_whole_state_resets_it_as_clearing_does():
    """``optimizer.state = defaultdict(dict)`` (a reset, ReLoRA-style) equals
    ``optimizer.state.clear()``: fresh state at the next step, saved by state_dict()."""
    m1, o1, m2, o2 = twins()
    o1.state = collections.defaultdict(dict)
    o2.state.clear()
    train(m1, o1, 2, seed=4)
    train(m2, o2, 2, seed=4)
    assert_same(list(m1.parameters()), list(m2.parameters()))
    assert len(o1.state_dict()["state"]) == len(list(m1.parameters()))
    assert o1.state[m1[0].weight]["step"] == 2


ASSIGNMENTS = {
    "vmean shape": (lambda s: s.__setitem__("vmean", torch.zeros(3)), "vmean of shape (3,)"),
    "vmean dtype": (lambda s: s.__setitem__("vmean", s["vmean"].half()), "torch.float16"),
    "codes dtype": (lambda s: s.__setitem__("codes", s["codes"].long()), "torch.int64"),
    "deleted": (lambda s: s.pop("codes"), "has no 'codes'"),
    "period": (lambda s: s.update(period=3), "period 3"),
    # ZeroRedundancyOptimizer.load_state_dict puts saved entries into the state as they are
    "saved entry": (lambda s: s.update(step=checkpoint.MARKER, gefen_step=s["step"]),
                    "saved checkpoint entry (its step is Gefen's marker)"),
}


@pytest.mark.parametrize("case", ASSIGNMENTS)
def test_invalid_assigned_state_is_refused_by_name_before_any_kernel(case):
    model, opt = stepped()
    weight = model[1].weight
    before = [p.detach().clone() for p in model.parameters()]
    assign, needle = ASSIGNMENTS[case]
    assign(opt.state[weight])
    with pytest.raises(ValueError, match=r"Gefen: optimizer.state of parameter 2 of param group "
                                         r"0 \(1.weight\)") as info:
        train(model, opt, 1)
    assert needle in str(info.value)
    # only the fix that holds for it: a saved entry is no state to rebuild or reassign
    assert ("build the" in str(info.value)) != (case == "saved entry")
    assert_same(list(model.parameters()), before)


def test_the_steady_state_step_keeps_its_buckets_and_other_keys_do_not_rebuild():
    model, opt = stepped()
    buckets = opt._buckets
    opt.state[model[0].weight]["note"] = "a user's own key"
    train(model, opt, 2)
    assert opt._buckets is buckets
    opt.state[model[0].weight]["vmean"] = opt.state[model[0].weight]["vmean"].clone()
    train(model, opt, 1)
    assert opt._buckets is not buckets


def test_reading_adamws_moments_says_where_they_went():
    """Logging code written for AdamW (``opt.state[p]["exp_avg"].norm()``) under the runner."""
    model, opt = stepped()
    entry = opt.state[model[0].weight]
    with pytest.raises(KeyError, match="keeps no exp_avg.*adamw_state_dict"):
        entry["exp_avg"]
    assert "exp_avg" not in entry and entry.get("exp_avg") is None
    with pytest.raises(KeyError) as unknown:
        entry["no such key"]
    assert unknown.value.args == ("no such key",)
    exp_avg = gefen_compile.adamw_state_dict(opt)["state"][0]["exp_avg"]
    assert exp_avg.shape == model[0].weight.shape and exp_avg.abs().sum() > 0


def test_saved_and_copied_state_holds_plain_dicts():
    model, opt = stepped()
    sd = opt.state_dict()
    assert all(type(e) is dict for e in sd["state"].values())
    copied = copy.deepcopy(opt)
    assert all(type(e) is dict for e in copied.state.values())
    train(model, copy.deepcopy(opt), 1)


# --------------------------------------------------------------------------------------------
# meta-device parameters


def test_meta_parameters_are_refused_with_the_fix_which_then_works():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = Gefen(model.named_parameters(), lr=1e-2)
    model(torch.randn(5, 8, device="meta")).sum().backward()
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 \(0.weight\) is on the meta device"
                                         r".*model.to_empty\(device=...\)"):
        opt.step()
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for layer in model:
        layer.reset_parameters()
    opt = Gefen(model.named_parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 2)
    assert all(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
