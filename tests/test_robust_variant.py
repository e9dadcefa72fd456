"""The robust default against the published method, where they differ (GEFEN_SPEC "Robust
variant (the default)"): training that the published rule makes diverge, zero gradients, and
prime-length tensors. tests/test_step_reference.py checks both variants' every step against the
slow reference; benchmarks/quality/ measures them on real workloads."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from gefen_compile import Gefen, memory_report

# Configurations of the 27-MLP family (samples x inputs -> hidden -> outputs, activation,
# seed) on which the published method diverges: every tensor is at period 1.
DIVERGING = [((64, 32, 64, 8), nn.GELU, 1), ((128, 16, 32, 4), nn.ReLU, 1),
             ((64, 32, 64, 8), nn.Tanh, 0)]
STEPS = 100


def train_mlp(size, activation, seed, optimizer) -> list[float]:
    """Full-batch regression on random targets, lr 1e-3: the loss before each step, then the
    final loss."""
    n, inputs, hidden, outputs = size
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, inputs, generator=gen), torch.randn(n, outputs, generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(inputs, hidden), activation(), nn.Linear(hidden, outputs))
    opt = optimizer(model.parameters())
    losses = []
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses + [nn.functional.mse_loss(model(x), y).item()]


@pytest.mark.parametrize(("size", "activation", "seed"), DIVERGING)
def test_robust_default_trains_where_the_published_method_diverges(size, activation, seed):
    adamw = train_mlp(size, activation, seed, lambda p: torch.optim.AdamW(p, lr=1e-3))
    robust = train_mlp(size, activation, seed, lambda p: Gefen(p, lr=1e-3))
    published = train_mlp(size, activation, seed,
                          lambda p: Gefen(p, lr=1e-3, variant="published"))
    assert robust[-1] < 1.2 * adamw[-1] < 1.2 * adamw[0]
    # The published method as published: its three-value codebook blows the loss up.
    assert not published[-1] < published[0]


def test_zero_gradient_elements_never_move():
    """Dead units' biases (always a zero gradient) beside a large weight: the robust codebook
    stores their zero first moment exactly, as AdamW does; the published one cannot."""
    moved = {}
    for variant in ("robust", "published"):
        torch.manual_seed(0)
        weight = nn.Parameter(torch.randn(512, 512))
        bias = nn.Parameter(torch.zeros(16))
        opt = Gefen([weight, bias], lr=1e-3, weight_decay=0.0, variant=variant)
        dead = torch.arange(16) % 2 == 1
        for step in range(3):
            weight.grad = torch.randn(512, 512)
            bias.grad = torch.randn(16) * ~dead
            opt.step()
        assert opt.state[bias]["period"] == 1
        moved[variant] = bias.detach()[dead].abs().max().item()
    assert moved["robust"] == 0.0
    assert moved["published"] > 1.0  # far: 0 + eps under a dequantised non-zero moment


def regression_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 4))


def regression_step(model, opt, scale=1.0):
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(64, 16, generator=gen), torch.randn(64, 4, generator=gen)
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    (loss * scale).backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_all_zero_first_gradient_teaches_nothing(weight_decay):
    """A `loss * 0` warm-up step: no period, no codebook, only AdamW's weight decay; training
    afterwards is what it would have been from that point."""
    lr = 1e-2
    warmed, fresh = regression_mlp(), regression_mlp()
    opt = Gefen(warmed.parameters(), lr=lr, weight_decay=weight_decay)
    twin = Gefen(fresh.parameters(), lr=lr, weight_decay=weight_decay)
    before = [p.detach().clone() for p in warmed.parameters()]
    regression_step(warmed, opt, scale=0.0)
    assert opt.codebook is None and not any(opt.state.get(p) for p in warmed.parameters())
    for p, b in zip(warmed.parameters(), before):
        torch.testing.assert_close(p.detach(), b * (1 - lr * weight_decay), rtol=1e-6, atol=0)
    with torch.no_grad():  # the twin starts where the warm-up left the weights
        for p, q in zip(fresh.parameters(), warmed.parameters()):
            p.copy_(q)
    for _ in range(5):
        regression_step(warmed, opt)
        regression_step(fresh, twin)
    assert torch.equal(opt.codebook, twin.codebook)
    for p, q in zip(warmed.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p]["period"] == twin.state[q]["period"]


def test_published_method_learns_from_an_all_zero_first_gradient():
    model = regression_mlp()
    opt = Gefen(model.parameters(), lr=1e-2, variant="published")
    regression_step(model, opt, scale=0.0)
    assert all(opt.state[p]["period"] == 1 for p in model.parameters())
    assert len(torch.unique(opt.codebook)) == 3  # -1, 0, +1 and copies: as published


def test_zero_gradient_parameter_waits_for_its_first_non_zero_gradient():
    """Per parameter: one tensor with a zero first gradient waits while the others train; its
    state is set up, with the codebook already learned, at its first non-zero gradient."""
    a, b = nn.Parameter(torch.randn(32, 16)), nn.Parameter(torch.randn(32, 16))
    opt = Gefen([a, b], lr=1e-2)
    a.grad, b.grad = torch.randn(32, 16), torch.zeros(32, 16)
    opt.step()
    codebook = opt.codebook.clone()
    assert opt.state[a] and not opt.state.get(b)
    for _ in range(2):
        a.grad, b.grad = torch.randn(32, 16), torch.randn(32, 16)
        opt.step()
    assert torch.equal(opt.codebook, codebook)
    assert opt.state[b]["step"].item() == 2 and opt.state[a]["step"].item() == 3


@pytest.mark.parametrize("n", [257, 7919, 65521])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prime_length_tensors_cost_less_than_adamw(n, dtype):
    """Period 1 with magnitude blocks of 256 (the last shorter): ~5 bytes/param in fp32, where
    the published Q = 1 costs 9."""
    cost = {}
    for variant in ("robust", "published"):
        p = nn.Parameter(torch.randn(n).to(dtype))
        opt = Gefen([p], variant=variant)
        p.grad = torch.randn(n).to(dtype)
        opt.step()
        assert opt.state[p]["period"] == 1
        cost[variant] = memory_report(opt).gefen_bytes_per_param
    # codes, per-element second moments, a magnitude per 256 (and alignment padding)
    assert cost["robust"] < 1 + dtype.itemsize + 0.1 < 8
    assert cost["published"] >= 1 + 2 * dtype.itemsize  # Q = 1: a magnitude per element


def test_unknown_variant_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"variant must be one of \('robust', 'published'\)"):
        Gefen([nn.Parameter(torch.zeros(3))], variant="paper")


def test_state_dict_without_variant_loads_as_published():
    """Checkpoints saved before the variant existed hold the published layout."""
    p = nn.Parameter(torch.randn(1000))
    opt = Gefen([p], variant="published")
    p.grad = torch.randn(1000)
    opt.step()
    saved = opt.state_dict()
    del saved["variant"]
    q = nn.Parameter(p.detach().clone())
    loaded = Gefen([q])
    loaded.load_state_dict(saved)
    assert loaded.variant.name == "published"
    for opt_, param in ((opt, p), (loaded, q)):
        param.grad = torch.ones(1000)
        opt_.step()
    assert torch.equal(p, q)


def rows_in_groups(shape, rows_per_group, seed=0):
    """A gradient whose rows come in groups of equal scale (8 token rows of a byte embedding,
    say): the published inference reads the group as the period."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(3 * torch.randn(shape[0] // rows_per_group, generator=gen))
    scales = scales.repeat_interleave(rows_per_group).view(-1, *[1] * (len(shape) - 1))
    return scales * torch.randn(shape, generator=gen)


@pytest.mark.parametrize(("shape", "published", "robust"), [
    ((64, 256), 2048, 256),  # 8 rows per inferred block: one second moment per row
    ((64, 4, 3, 3), 288, 36),  # a conv weight: rows of in * kh * kw
    ((64, 8, 1, 9), 576, 72),  # also where the kernel's width is over 8
    ((64, 8), 64, 64),  # rows of 8: left alone (a moment per row would cost > 1 byte/param)
])
def test_robust_periods_never_span_rows(shape, published, robust):
    assert periods_of(rows_in_groups(shape, 8)) == {"published": published, "robust": robust}


def test_robust_periods_never_span_the_rows_of_fused_moe_experts():
    # transformers' fused experts (experts, out, in): 16 output rows of one expert per
    # inferred block; a row is the last dimension, as for each expert's own Linear weight.
    grad = rows_in_groups((8 * 64, 128), 16).view(8, 64, 128)
    assert periods_of(grad) == {"published": 2048, "robust": 128}


def periods_of(grad):
    """The period each variant gives a parameter whose first gradient is ``grad``."""
    periods = {}
    for variant in ("robust", "published"):
        p = nn.Parameter(torch.zeros(grad.shape))
        opt = Gefen([p], variant=variant)
        p.grad = grad.clone()
        opt.step()
        periods[variant] = opt.state[p]["period"]
    return periods


# ---- thin codebooks: provisional until learned from enough values ----

def thin_then_full(variant):
    """A 3-element scale steps alone (a thin codebook), then a matrix has its first gradient
    while the scale has none; returns the optimizer, the parameters, the first gradients and
    the scale's codebook entries and the codebook before the second step."""
    torch.manual_seed(0)
    scale, weight = nn.Parameter(torch.ones(3)), nn.Parameter(torch.randn(32, 64))
    opt = Gefen([scale, weight], lr=1e-2, variant=variant)
    first_scale = torch.tensor([0.5, -2.0, 1.0])
    first_weight = torch.randn(32, 64) * torch.logspace(-2, 0, 32)[:, None]
    scale.grad = first_scale.clone()
    opt.step()
    entries = opt.codebook[opt.state[scale]["codes"].long()]
    first_codebook = opt.codebook.clone()
    scale.grad, weight.grad = None, first_weight.clone()
    opt.step()
    return opt, (scale, weight), (first_scale, first_weight), entries, first_codebook


def test_a_thin_codebook_is_learned_again_from_every_first_gradient_and_codes_follow():
    """Robust: the codebook of a first step that saw three values is provisional; the next
    parameter's first gradient gives the codebook of both histograms (reference.py's), and the
    stored codes of the first move to the new entries nearest their old ones. Then it is final."""
    from reference import ref_histogram, ref_nearest

    from gefen_compile.codebook import learn_codebook

    opt, (scale, weight), (first_scale, first_weight), entries, _ = thin_then_full("robust")
    period = opt.state[weight]["period"]
    # Robust histogram rows: a period-1 tensor's magnitude blocks, of 256 elements or fewer.
    rows = [3, 256 if period == 1 else period]
    counts = ref_histogram(first_scale, rows[0]) + ref_histogram(first_weight, rows[1])
    expected = learn_codebook(torch.from_numpy(counts))
    assert len(expected.unique()) == 256
    assert torch.equal(opt.codebook, expected)
    codes = ref_nearest(entries.numpy(), expected.numpy())
    assert opt.state[scale]["codes"].tolist() == codes.tolist()
    assert "codebook_histogram" not in opt.state_dict()
    late = nn.Parameter(torch.randn(8))
    opt.add_param_group({"params": [late]})
    late.grad = torch.tensor([1.0, -1.0, 0.25, 0.0, 3.0, -0.5, 2.0, 1.5])
    opt.step()
    assert torch.equal(opt.codebook, expected)  # final


def test_a_thin_codebook_is_learned_again_from_each_steps_gradients_until_it_is_not(monkeypatch):
    """Robust: where every parameter had state from the first step (fitting a 5-element
    vector), the thin codebook is learned again at each step from that step's gradients, on top
    of every histogram so far (reference.py's), until it is not thin; then it is final. A step
    with a non-finite gradient teaches it nothing, nor one captured in a CUDA graph. The element with the smallest first gradient
    then moves as under AdamW: with the first codebook kept it coded to 0 and stayed at 0.0
    for 200 steps (loss 4.70 against AdamW's 0.0065)."""
    from reference import ref_histogram

    from gefen_compile.codebook import learn_codebook

    target = -torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])

    def fit(opt, p, steps, on_step=lambda g: None):
        for _ in range(steps):
            opt.zero_grad()
            loss = ((p - target) ** 2).sum()
            loss.backward()
            on_step(p.grad.clone())
            opt.step()
        return loss.item()

    p = nn.Parameter(torch.zeros(5))
    opt = Gefen([p], lr=0.05, weight_decay=0.0)
    counts = np.zeros(4096, dtype=np.int64)
    provisional = []

    def expect(g):
        if "codebook_histogram" in opt.state_dict() or not provisional:
            counts[:] += ref_histogram(g, 5)
            provisional.append(learn_codebook(torch.from_numpy(counts.copy())))

    fit(opt, p, 3, expect)
    assert len(provisional) == 3 and torch.equal(opt.codebook, provisional[-1])
    assert "codebook_histogram" in opt.state_dict()  # still thin: three steps' values
    twin_p, twin = copy.deepcopy((p, opt))
    twin_p.grad = torch.tensor([float("nan"), 1.0, 2.0, 3.0, 4.0])
    twin.step()
    assert torch.equal(twin.codebook, opt.codebook)
    twin_p, twin = copy.deepcopy((p, opt))  # a step captured in a CUDA graph must not sync
    twin_p.grad = torch.tensor([0.3, -0.7, 1.1, 2.9, -5.0])  # values not seen yet
    with monkeypatch.context() as patched:
        patched.setattr(torch.cuda, "is_available", lambda: True)
        patched.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        twin.step()
    assert torch.equal(twin.codebook, opt.codebook)
    loss = fit(opt, p, 200)
    final = opt.codebook.clone()
    assert "codebook_histogram" not in opt.state_dict() and len(final.unique()) == 256
    fit(opt, p, 5)
    assert torch.equal(opt.codebook, final)
    adamw_p = nn.Parameter(torch.zeros(5))
    adamw_loss = fit(torch.optim.AdamW([adamw_p], lr=0.05, weight_decay=0.0), adamw_p, 200)
    assert loss < 2 * adamw_loss + 1e-3 and abs(p[0].item() + 1) < 0.05

    published = nn.Parameter(torch.zeros(5))
    opt = Gefen([published], lr=0.05, weight_decay=0.0, variant="published")
    fit(opt, published, 1)
    first = opt.codebook.clone()
    fit(opt, published, 20)
    assert torch.equal(opt.codebook, first)


def test_published_codebook_stays_as_first_learned():
    opt, _, _, _, first_codebook = thin_then_full("published")
    assert len(first_codebook.unique()) == 3  # -1, +1 and the centre of the top bin
    assert torch.equal(opt.codebook, first_codebook)
    assert "codebook_histogram" not in opt.state_dict()


@pytest.mark.parametrize("transport", ["object", "torch.save"])
def test_a_provisional_codebook_resumes_bit_identically(transport, tmp_path):
    """The histogram of a provisional codebook is saved, so a run resumed between its first
    step and the next parameter's first gradient relearns it as an uninterrupted run does."""
    torch.manual_seed(0)
    shapes = [(3,), (32, 64), (64,)]
    grads = [[torch.randn(s) * (k + 1) for s in shapes] for k in range(4)]

    def run(opt, params, steps):
        for k in steps:
            for i, (p, g) in enumerate(zip(params, grads[k])):
                p.grad = g.clone() if k or i == 0 else None  # step 0: the scale alone
            opt.step()

    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    resumed_params = [nn.Parameter(p.detach().clone()) for p in params]
    opt = Gefen(params, lr=1e-2)
    run(opt, params, [0])
    state_dict = opt.state_dict()
    assert state_dict["codebook_histogram"].dtype == torch.int64
    if transport == "torch.save":
        torch.save(state_dict, tmp_path / "opt.pt")
        state_dict = torch.load(tmp_path / "opt.pt", weights_only=True)
    for p, q in zip(params, resumed_params):
        q.data.copy_(p)
    resumed = Gefen(resumed_params, lr=1e-2)
    resumed.load_state_dict(state_dict)
    run(opt, params, [1, 2, 3])
    run(resumed, resumed_params, [1, 2, 3])
    assert torch.equal(opt.codebook, resumed.codebook) and len(opt.codebook.unique()) == 256
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def test_a_saved_histogram_that_cannot_be_a_provisional_codebooks_is_refused():
    opt, _, _, _, _ = thin_then_full("robust")
    params = [p for group in opt.param_groups for p in group["params"]]
    state_dict = opt.state_dict()
    state_dict["codebook_histogram"] = torch.ones(4096, dtype=torch.int64)  # not thin
    fresh = Gefen([nn.Parameter(p.detach().clone()) for p in params])
    with pytest.raises(ValueError, match="codebook_histogram.*unchanged"):
        fresh.load_state_dict(state_dict)
    assert fresh.codebook is None


def test_training_that_starts_with_a_scale_alone_reaches_adamws_loss():
    """Staged unfreezing: only a learnable output scale trains for 5 steps. With the first
    codebook kept (4 distinct values) Gefen's loss ended at 0.55 where AdamW's reached 4e-6."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 32, generator=gen), torch.randn(32, 8, generator=gen)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(512, 8, generator=gen)

    def final_loss(optimizer):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 8))
        scale = nn.Parameter(torch.ones(1))
        opt = optimizer(list(model.parameters()) + [scale])
        for step in range(200):
            model.requires_grad_(step >= 5)
            opt.zero_grad()
            ((model(x) * scale - y) ** 2).mean().backward()
            opt.step()
        return ((model(x) * scale - y) ** 2).mean().item()

    adamw = final_loss(lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0))
    gefen = final_loss(lambda p: Gefen(p, lr=3e-3, weight_decay=0.0))
    assert gefen < 0.02 + 2 * adamw, (gefen, adamw)
