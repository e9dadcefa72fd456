"""Gefen under torch.distributed: DDP and FSDP2 (fully_shard) on two gloo CPU ranks, a
distributed checkpoint and its resumption, against single-process Gefen.

The two ranks are spawned once for the module (tests/distributed_workers.py holds what they run)
and leave their results in files that the tests compare.
"""

import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

# After the check: the workers import torch.distributed's submodules.
import distributed_workers as workers  # noqa: E402
from gefen_compile import Gefen, GefenMuon, ops  # noqa: E402
from gefen_compile.codebook import learn_codebook  # noqa: E402
from gefen_compile.first_step import infer_period, shard_period  # noqa: E402
from gefen_compile.variant import ROBUST  # noqa: E402

SPAWN_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each rank saved: [rank 0's results, rank 1's]."""
    out = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        workers.run, args=(str(out / "init"), str(out)), nprocs=workers.WORLD_SIZE,
        join=False, start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the distributed ranks did not finish in {SPAWN_TIMEOUT_S} s"
                            + _faults(out))
    except mp.ProcessExitedException as exc:
        pytest.fail(f"{exc}{_faults(out)}")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(workers.WORLD_SIZE)]


def _faults(out) -> str:
    """The ranks' fatal-signal tracebacks (faulthandler), so a crash on CI shows where."""
    reports = []
    for rank in range(workers.WORLD_SIZE):
        path = workers.faults_file(out, rank)
        text = path.read_text() if path.exists() else ""
        if text.strip():
            reports.append(f"\n--- rank {rank} ---\n{text}")
    return "".join(reports)


def max_relative_difference(a: dict, b: dict) -> float:
    """Largest over tensors of max |a - b| / max |b|."""
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in b)


@pytest.mark.parametrize("lr", workers.DDP_LRS)
def test_ddp_ranks_hold_identical_parameters_periods_and_codebook(ranks, lr):
    first, second = (r["ddp"][lr] for r in ranks)
    assert first["params"].keys() == second["params"].keys()
    for name in first["params"]:
        assert torch.equal(first["params"][name], second["params"][name]), name
    assert first["periods"] == second["periods"]
    assert torch.equal(first["codebook"], second["codebook"])


# Gefen's default lr gives the authors' figure (about 1e-3 after 6 steps); the difference is
# quantisation noise (a code flips to its neighbour), so it grows with lr.
@pytest.mark.parametrize("lr, bound", [(1e-3, 1e-3), (workers.LR, 5e-3)])
def test_ddp_matches_a_single_process_on_the_global_batch(ranks, lr, bound):
    model, opt, _ = workers.reference(workers.DDP_STEPS, lr=lr)
    ddp = ranks[0]["ddp"][lr]
    assert ddp["periods"] == [opt.state[p]["period"] for p in model.parameters()]
    assert max_relative_difference(ddp["params"], model.state_dict()) < bound


def test_fsdp_ranks_learn_one_codebook_from_every_shard(ranks):
    fsdp = [r["fsdp"] for r in ranks]
    assert torch.equal(fsdp[0]["codebook"], fsdp[1]["codebook"])
    # The codebook of the summed histogram of both ranks' first local gradients.
    grads, rows = [], []
    for r in fsdp:
        for name, grad in r["first_grads"].items():
            grads.append(grad)
            rows.append(ROBUST.histogram_row(grad.numel(), r["state"][name]["period"]))
    counts = ops.histogram(grads, rows, [False] * len(grads))
    assert torch.equal(fsdp[0]["codebook"], learn_codebook(counts))


def test_hsdp_counts_each_replicated_parameter_once(ranks):
    hsdp = [r["hsdp"] for r in ranks]
    assert hsdp[0]["placements"] == ["Replicate", "Shard"]
    for name, value in hsdp[0]["params"].items():
        assert torch.equal(hsdp[1]["params"][name], value), name
    assert torch.equal(hsdp[0]["codebook"], hsdp[1]["codebook"])
    for r in hsdp:  # each rank's gradients are the whole gradients: the sum is one copy
        assert torch.equal(r["global_histogram"], r["local_histogram"])


def test_fsdp_periods_are_inferred_per_local_shard(ranks):
    periods = set()
    for r in ranks:
        fsdp = r["fsdp"]
        for name, grad in fsdp["first_grads"].items():
            assert fsdp["state"][name]["period"] == infer_period(grad, ROBUST), name
            assert fsdp["state"][name]["codes"].numel() == grad.numel()
            periods.add(fsdp["state"][name]["period"])
        assert fsdp["report_numel"] == sum(g.numel() for g in fsdp["first_grads"].values())
    assert max(periods) > 1


def test_fsdp_state_dict_layout(ranks):
    assert ranks[0]["fsdp"]["layout"] == {
        "codes": "DTensor", "step": "bytes", "gefen_step": "Tensor", "per_rank": "dict",
        "codebook": "Tensor",
    }  # "step": the marker that makes a plain AdamW refuse the state (checkpoint.py)


@pytest.mark.parametrize("via", workers.CHECKPOINT_VIAS)
def test_fsdp_distributed_checkpoint_resumes_bit_identically(ranks, via):
    for r in ranks:
        fsdp, resumed_run = r["fsdp"], r["fsdp"][via]
        assert resumed_run["materialising_step_learned_nothing"]
        assert resumed_run["losses"] == fsdp["losses"][workers.CHECKPOINT_AT:]
        assert torch.equal(resumed_run["codebook"], fsdp["codebook"])
        for name, value in fsdp["params"].items():
            assert torch.equal(resumed_run["params"][name], value), name
        for name, state in fsdp["state"].items():
            resumed = resumed_run["state"][name]
            assert resumed.keys() == state.keys(), name
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(resumed[key], value), (name, key)
                else:
                    assert resumed[key] == value, (name, key)


def test_fsdp_a_non_finite_first_gradient_shard_is_refused_on_every_rank(ranks):
    """One rank's shard holds a NaN: both ranks raise the error that names the parameter (a
    rank that did not would wait in the next collective), and both step after skipping."""
    for rank in ranks:
        result = rank["fsdp_nan"]
        assert result["error"] and "parameter 0 of param group 0 has inf or nan" in result["error"]
        assert result["stepped"] and all(map(math.isfinite, result["losses"]))


def test_fsdp_a_shard_with_an_all_zero_first_gradient_takes_the_period_of_the_others(ranks):
    """Not period 1 (inferred from zeros: ~4 more bytes per element on that rank): the period
    the rank with a non-zero shard inferred, which divides the zero shard's size here."""
    informed, zero = (r["fsdp_zero_shard"] for r in ranks)
    assert not zero["first_grad"].any() and informed["first_grad"].any()
    period = infer_period(informed["first_grad"], ROBUST)
    assert period > 1 and informed["period"] == period
    assert zero["period"] == period
    n = zero["first_grad"].numel()
    assert zero["vmean_numel"] == zero["magnitude_numel"] == n // period


def test_shard_period_fits_the_informed_period_to_the_shard():
    assert shard_period(64, (10, 64), ROBUST) == 64
    assert shard_period(64, (2, 64), ROBUST) == 32  # at least four blocks
    assert shard_period(96, (10, 64), ROBUST) == 32  # the largest divisor of both
    assert shard_period(64, (0, 64), ROBUST) == 1  # an empty shard (uneven sharding)


def test_fsdp_loss_tracks_single_process(ranks):
    _, _, reference = workers.reference(workers.FSDP_STEPS)
    losses = ranks[0]["fsdp"]["losses"]
    assert losses == ranks[1]["fsdp"]["losses"]
    assert losses[-1] < 0.5 * losses[0]
    for step, (loss, expected) in enumerate(zip(losses, reference)):
        assert abs(loss - expected) <= 0.01 * expected, step


def test_torch_state_dict_helper_step_learns_nothing(caplog):
    # get_optimizer_state_dict steps an optimizer without state with zero gradients and lr 0.
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = nn.Linear(16, 8)
    before = [p.detach().clone() for p in model.parameters()]
    opt = Gefen(model.parameters(), lr=1e-2)
    with caplog.at_level("WARNING", logger="gefen_compile"):
        state_dict = get_optimizer_state_dict(model, opt)
    assert opt.codebook is None and not opt.state and state_dict["state"] == {}
    # A dcp.load into that state_dict would restore nothing, where AdamW's would: said so.
    assert "for 2 parameters that are not DTensors" in caplog.text and "torch.save" in caplog.text
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.param_groups[0]["lr"] == 1e-2
    # The first real step still learns from its own gradients.
    model(torch.randn(4, 16)).square().mean().backward()
    opt.step()
    assert opt.codebook is not None and len(opt.state) == 2


def test_lr_zero_zero_gradient_step_leaves_parameters_without_state_stateless():
    # Torch versions that materialise state only for the parameters missing it.
    trained, late = nn.Parameter(torch.randn(64)), nn.Parameter(torch.randn(32))
    opt = Gefen([trained, late], lr=1e-2)
    trained.grad = torch.randn(64)
    opt.step()
    codebook = opt.codebook.clone()
    opt.param_groups[0]["lr"] = 0.0
    late.grad = torch.zeros(32)
    trained.grad = None
    opt.step()
    assert late not in opt.state and torch.equal(opt.codebook, codebook)
    opt.param_groups[0]["lr"] = 1e-2
    late.grad = torch.randn(32)
    opt.step()
    assert opt.state[late]["period"] >= 1 and float(opt.state[late]["step"]) == 1


def test_published_zero_gradient_first_step_with_a_learning_rate_still_initialises():
    # Only the lr = 0 helper step is skipped: with lr > 0 a zero gradient is a gradient to the
    # published method (the robust default learns nothing from it: test_robust_variant.py).
    p = nn.Parameter(torch.ones(64))
    opt = Gefen([p], lr=1e-2, variant="published")
    p.grad = torch.zeros(64)
    opt.step()
    assert opt.codebook is not None and opt.state[p]["period"] == 1
    assert float(opt.state[p]["step"]) == 1


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group in this process, for DTensor parameters without spawning."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sharded_linear(placement):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    torch.manual_seed(0)
    model = nn.Linear(64, 32)
    return fully_shard(model, shard_placement_fn=lambda p: Shard(min(placement, p.ndim - 1)))


def test_fresh_sharded_optimizer_state_dict_is_a_complete_destination(one_rank_group):
    model = sharded_linear(0)
    state_dict = Gefen(model.parameters()).state_dict()
    assert bool(state_dict["codebook"].isnan().all())
    for i, p in enumerate(model.parameters()):
        entry = state_dict["state"][i]
        assert entry["codes"].shape == p.shape and entry["codes"].placements == p.placements
        assert entry["per_rank"] == {"rank0": b""}
    # Loading it gives an optimizer without state, as before.
    fresh = Gefen(model.parameters())
    fresh.load_state_dict(state_dict)
    assert fresh.codebook is None and not fresh.state


def test_sharded_state_loads_only_onto_the_same_sharding(one_rank_group):
    model = sharded_linear(0)
    opt = Gefen(model.parameters())
    model(torch.randn(4, 64)).square().mean().backward()
    opt.step()
    state_dict = opt.state_dict()
    same = Gefen(sharded_linear(0).parameters())
    same.load_state_dict(state_dict)
    assert torch.equal(same.codebook, opt.codebook)
    other = Gefen(sharded_linear(1).parameters())
    with pytest.raises(ValueError, match="same mesh and sharding"):
        other.load_state_dict(state_dict)
    unsharded = nn.Linear(64, 32)
    unsharded_opt = Gefen(unsharded.parameters())
    unsharded(torch.randn(4, 64)).square().mean().backward()
    unsharded_opt.step()
    with pytest.raises(ValueError, match="no per-rank record"):
        same.load_state_dict(unsharded_opt.state_dict())


@pytest.mark.parametrize("via", ["optimizer.state_dict", "get_optimizer_state_dict"])
def test_a_provisional_codebook_of_sharded_parameters_resumes_bit_identically(one_rank_group, via,
                                                                              caplog):
    """Only the bias has a first gradient (a thin, provisional codebook), then both have: the
    histogram travels in the per-rank records, which torch's state_dict helpers keep where
    they drop the top level, so a resumed run relearns the codebook as an uninterrupted one."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    def step(model, opt, k, bias_only=False):
        model(torch.randn(4, 64, generator=torch.Generator().manual_seed(k))).square().mean().backward()
        if bias_only:
            model.weight.grad = None
        opt.step()
        opt.zero_grad()

    model = sharded_linear(0)
    opt = Gefen(model.parameters())
    step(model, opt, 0, bias_only=True)
    if via == "get_optimizer_state_dict":
        state_dict = get_optimizer_state_dict(model, opt)
        assert "codebook_histogram" not in state_dict  # the top level is dropped
    else:
        state_dict = opt.state_dict()
    resumed_model = sharded_linear(0)
    resumed_model.load_state_dict(model.state_dict())
    resumed = Gefen(resumed_model.parameters())
    if via == "get_optimizer_state_dict":
        with caplog.at_level("WARNING", logger="gefen_compile"):
            set_optimizer_state_dict(resumed_model, resumed, state_dict)
        assert "not DTensors" not in caplog.text  # sharded state loads through the helpers
    else:
        resumed.load_state_dict(state_dict)
    for k in (1, 2):
        step(model, opt, k)
        step(resumed_model, resumed, k)
    assert len(opt.codebook.unique()) == 256 and torch.equal(resumed.codebook, opt.codebook)
    assert resumed.variant is opt.variant
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p.to_local(), q.to_local())


@pytest.mark.parametrize("saved, loader", [("robust", "published"), ("published", "robust")])
def test_the_variant_survives_torchs_state_dict_helpers(one_rank_group, saved, loader):
    """torch's helpers drop the top-level "variant"; the records keep it, so a sharded run
    resumes with the variant it saved, as a single-process one does."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    model = sharded_linear(0)
    opt = Gefen(model.parameters(), variant=saved)
    model(torch.randn(4, 64)).square().mean().backward()
    opt.step()
    state_dict = get_optimizer_state_dict(model, opt)
    assert "variant" not in state_dict
    resumed_model = sharded_linear(0)
    resumed = Gefen(resumed_model.parameters(), variant=loader)
    set_optimizer_state_dict(resumed_model, resumed, state_dict)
    assert resumed.variant.name == saved


def test_muon_sharded_state_errors_name_gefen_muon(one_rank_group):
    model = sharded_linear(0)
    opt = GefenMuon([model.weight])
    model(torch.randn(4, 64)).square().mean().backward()
    opt.step()
    other = GefenMuon([sharded_linear(1).weight])
    with pytest.raises(ValueError, match=r"^GefenMuon\.load_state_dict: parameter 0 was saved"):
        other.load_state_dict(opt.state_dict())
    mixed = GefenMuon([model.weight, nn.Parameter(torch.randn(4, 4))])
    with pytest.raises(NotImplementedError, match=r"^GefenMuon\.state_dict: parameter 1 is a plain"):
        mixed.state_dict()


# ---- GefenMuon for the matrices, Gefen for the rest ----

def test_muon_ddp_ranks_agree_and_match_a_single_process(ranks):
    first, second = (r["muon_ddp"] for r in ranks)
    for name, value in first["params"].items():
        assert torch.equal(second["params"][name], value), name
    assert torch.equal(first["codebook"], second["codebook"])
    # GefenMuon's codes amplify rounding differences of the gradients (a code flips to its
    # neighbour; the global batch's gradient differs in the last bits): compared with DDP's
    # own reduction, bit for bit.
    model, _, _ = workers.muon_reference(workers.DDP_STEPS, as_ddp=True)
    for name, value in model.state_dict().items():
        assert torch.equal(first["params"][name], value), name


def test_muon_fsdp_gathers_each_update_once_and_tracks_a_single_process(ranks):
    fsdp = [r["muon_fsdp"] for r in ranks]
    # One all-gather of each matrix's bfloat16 update (three weights), nothing else: torch's
    # Muon, whose Newton-Schulz products run on DTensors, needs about a dozen per matrix.
    assert fsdp[0]["collectives"] == {"all_gather_into_tensor": 3}
    assert fsdp[0]["layout"] == {"codes": "DTensor", "per_rank": "dict", "codebook": "Tensor",
                                 "momentum_buffer": "bytes"}
    assert torch.equal(fsdp[0]["codebook"], fsdp[1]["codebook"])
    losses = fsdp[0]["losses"] + fsdp[0]["tail"]
    _, _, reference = workers.muon_reference(workers.FSDP_STEPS)
    reference = reference[:workers.CHECKPOINT_AT - 1] + reference[workers.CHECKPOINT_AT:]
    assert losses[-1] < 0.75 * losses[0]
    for step, (loss, expected) in enumerate(zip(losses, reference)):
        assert abs(loss - expected) <= 0.01 * expected, step


def test_muon_fsdp_checkpoint_resumes_bit_identically(ranks):
    for r in ranks:
        fsdp = r["muon_fsdp"]
        assert fsdp["resumed_tail"] == fsdp["tail"]
        for name, value in fsdp["params"].items():
            assert torch.equal(fsdp["resumed_params"][name], value), name
        for name, state in fsdp["state"].items():
            resumed = fsdp["resumed_state"][name]
            assert resumed.keys() == state.keys() == {"codes", "magnitude", "period"}, name
            assert resumed["period"] == state["period"]
            assert torch.equal(resumed["codes"], state["codes"])
            assert torch.equal(resumed["magnitude"], state["magnitude"])
