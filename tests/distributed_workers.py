"""What each rank runs for tests/test_distributed.py: DDP and FSDP2 (fully_shard) training with
Gefen (and GefenMuon for the matrices beside Gefen for the rest) on gloo, a distributed
checkpoint and its resumption. Each rank saves what the tests
compare (parameters, periods, codebooks, losses, first local gradients) to ``rank<r>.pt``.

The model and data are shared with the single-process reference the tests run themselves.
"""

from __future__ import annotations

import faulthandler
import gc
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from torch.distributed.tensor.debug import CommDebugMode

from gefen_compile import Gefen, GefenMuon, memory_report
from gefen_compile.distributed import global_histogram

WORLD_SIZE = 2
DDP_STEPS = 6
FSDP_STEPS = 12
CHECKPOINT_AT = 5  # FSDP2: steps taken before the distributed checkpoint
# The two ways of checkpointing the optimizer: its own state_dict, and torch's helpers (keyed
# by parameter names; their default options: flatten_optimizer_state_dict=True refuses the
# bytes of Gefen's per-rank records).
CHECKPOINT_VIAS = ("optimizer.state_dict", "get_optimizer_state_dict")
_HELPER_OPTIONS = StateDictOptions()
LR = 1e-2
MUON_LR = 2e-2
# DDP is compared with a single process at Gefen's default lr and at LR.
DDP_LRS = (1e-3, LR)
BATCH = 64


def make_model() -> nn.Module:
    """A small MLP; the same weights on every rank and in the reference (fixed seed)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 48), nn.Tanh(),
                         nn.Linear(48, 8))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: inputs and regression targets from a fixed teacher."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 32, generator=g)
    teacher = torch.randn(32, 8, generator=torch.Generator().manual_seed(7))
    return x, torch.tanh(x @ teacher) + 0.1 * torch.randn(BATCH, 8, generator=g)


def local_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's equal share of the global batch (so the averaged gradient is the global
    batch's)."""
    x, y = batch(step)
    return x.chunk(WORLD_SIZE)[rank], y.chunk(WORLD_SIZE)[rank]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def reference(steps: int, lr: float = LR) -> tuple[nn.Module, Gefen, list[float]]:
    """Single-process Gefen on the global batches."""
    model = make_model()
    opt = Gefen(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        loss = loss_of(model, *batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, opt, losses


def muon_optimizers(model: nn.Module) -> list:
    """The usual Muon split: GefenMuon for the weight matrices, Gefen for the biases."""
    named = list(model.named_parameters())
    return [GefenMuon([p for n, p in named if n.endswith("weight")], lr=MUON_LR),
            Gefen([p for n, p in named if n.endswith("bias")], lr=LR)]


def muon_reference(steps: int, as_ddp: bool = False) -> tuple[nn.Module, list, list[float]]:
    """Single-process GefenMuon + Gefen on the global batches; ``as_ddp``: from the mean of the
    ranks' local gradients, as DDP reduces them (a halving and a sum of two: exact), instead of
    the global batch's gradient."""
    model = make_model()
    opts = muon_optimizers(model)
    losses = []
    for step in range(steps):
        loss = loss_of(model, *batch(step))
        if as_ddp:
            local = []
            for rank in range(WORLD_SIZE):
                loss_of(model, *local_batch(step, rank)).backward()
                local.append([p.grad / WORLD_SIZE for p in model.parameters()])
                model.zero_grad()
            for p, *pieces in zip(model.parameters(), *local):
                p.grad = sum(pieces[1:], pieces[0])
        else:
            loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
    return model, opts, losses


def faults_file(out_dir: str | Path, rank: int) -> Path:
    """Where a rank's fatal-signal traceback goes, for the fixture to report."""
    return Path(out_dir) / f"rank{rank}.faults"


def run(rank: int, init_file: str, out_dir: str) -> None:
    """Entry point of each spawned rank."""
    faults = faults_file(out_dir, rank).open("w")
    faulthandler.enable(file=faults, all_threads=True)
    # Two ranks on a 2-core CI machine: one thread each, not two ranks of two threads.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        results = {"ddp": {lr: _ddp(rank, lr) for lr in DDP_LRS}, "hsdp": _hsdp(rank),
                   "fsdp": _fsdp(rank, Path(out_dir) / "checkpoint"),
                   "muon_ddp": _muon_ddp(rank),
                   "muon_fsdp": _muon_fsdp(rank, Path(out_dir) / "muon_checkpoint"),
                   "fsdp_nan": _fsdp_nan_first_gradient(rank),
                   "fsdp_zero_shard": _fsdp_zero_shard_first_gradient(rank)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        # FSDP's last collectives and the models' hooks must be gone on both ranks before either
        # closes its gloo connections: a peer closing early aborts the other rank.
        del results
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
        faulthandler.disable()
        faults.close()


def _ddp(rank: int, lr: float) -> dict:
    model = DistributedDataParallel(make_model())
    opt = Gefen(model.parameters(), lr=lr)
    for step in range(DDP_STEPS):
        loss_of(model, *local_batch(step, rank)).backward()
        opt.step()
        opt.zero_grad()
    return {
        "params": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
        "periods": [opt.state[p]["period"] for p in model.parameters()],
        "codebook": opt.codebook.clone(),
    }


def _hsdp(rank: int) -> dict:
    """fully_shard on a (replicate 2, shard 1) mesh: every rank holds whole parameters, as
    Replicate DTensors; the codebook must count each of them once, not once per rank."""
    model = _sharded_model((WORLD_SIZE, 1))
    opt = Gefen(model.parameters(), lr=LR)
    first_grads: dict = {}
    _train(model, opt, rank, range(2), first_grads)
    params = list(model.parameters())
    grads = [first_grads[n] for n, _ in model.named_parameters()]
    periods = [opt.state[p]["period"] for p in params]
    negate = [False] * len(params)
    return {
        "params": _local_params(model),
        "codebook": opt.codebook.clone(),
        "global_histogram": global_histogram(params, grads, periods, negate),
        "local_histogram": global_histogram(grads, grads, periods, negate),
        "placements": [type(pl).__name__ for pl in params[0].placements],
    }


def _sharded_model(mesh_shape: tuple[int, ...] = (WORLD_SIZE,)) -> nn.Module:
    """FSDP2 over a 1-D mesh; over a 2-D mesh, HSDP (replicated over the first dimension)."""
    model = make_model()
    names = ("replicate", "shard")[-len(mesh_shape):]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _train(model, opt, rank: int, steps: range, first_grads: dict | None = None) -> list[float]:
    """Steps of FSDP2 training (``opt``: an optimizer, or a list of them); returns the global
    batch's loss at each (the ranks' mean)."""
    losses = []
    for step in steps:
        loss = loss_of(model, *local_batch(step, rank))
        loss.backward()
        if first_grads is not None and step == 0:
            first_grads.update({n: p.grad.to_local().clone() for n, p in model.named_parameters()})
        for each in opt if isinstance(opt, list) else [opt]:
            each.step()
            each.zero_grad()
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / WORLD_SIZE)
    return losses


def _local_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.to_local().detach().clone() for n, p in model.named_parameters()}


def _fsdp(rank: int, checkpoint: Path) -> dict:
    model = _sharded_model()
    opt = Gefen(model.parameters(), lr=LR)
    first_grads: dict = {}
    losses = _train(model, opt, rank, range(CHECKPOINT_AT), first_grads)
    layout = {k: type(v).__name__ for k, v in opt.state_dict()["state"][0].items()}
    for via in CHECKPOINT_VIAS:
        optim_state = _optimizer_state(model, opt, via)
        dcp.save({"model": model.state_dict(), "optim": optim_state},
                 checkpoint_id=checkpoint / via)
    losses += _train(model, opt, rank, range(CHECKPOINT_AT, FSDP_STEPS))
    results = {
        "losses": losses,
        "params": _local_params(model),
        "state": _local_state(model, opt),
        "codebook": opt.codebook.clone(),
        "first_grads": first_grads,
        "layout": layout,
        "report_numel": memory_report(opt).numel,
    }
    for via in CHECKPOINT_VIAS:
        results[via] = _resume(rank, checkpoint / via, via)
    return results


def _fsdp_nan_first_gradient(rank: int) -> dict:
    """A NaN in rank 0's shard of a first gradient: every rank refuses the step (none waits in
    a collective for a rank that raised), and after skipping it as the error says, both step."""
    model = _sharded_model()
    opt = Gefen(model.parameters(), lr=LR)
    loss_of(model, *local_batch(0, rank)).backward()
    if rank == 0:
        next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")
    try:
        opt.step()
        error = None
    except ValueError as refused:
        error = str(refused)
    opt.zero_grad()
    losses = _train(model, opt, rank, range(1, 3))
    return {"error": error, "losses": losses, "stepped": bool(opt.state[next(model.parameters())])}


def _fsdp_zero_shard_first_gradient(rank: int) -> dict:
    """Rank 1's shard of the first weight has an all-zero first gradient (an embedding's rows
    no token of the batch used), rank 0's not."""
    model = _sharded_model()
    opt = Gefen(model.parameters(), lr=LR)
    loss_of(model, *local_batch(0, rank)).backward()
    weight = next(model.parameters())
    if rank == 1:
        weight.grad.to_local().zero_()
    first_grad = weight.grad.to_local().clone()
    opt.step()
    state = opt.state[weight]
    return {"first_grad": first_grad, "period": state["period"],
            "vmean_numel": state["vmean"].numel(), "magnitude_numel": state["magnitude"].numel()}


def _optimizer_state(model: nn.Module, opt: Gefen, via: str) -> dict:
    if via == "optimizer.state_dict":
        return opt.state_dict()
    return get_optimizer_state_dict(model, opt, options=_HELPER_OPTIONS)


def _resume(rank: int, checkpoint: Path, via: str) -> dict:
    """A fresh process's view: new model and optimizer, the checkpoint, the remaining steps."""
    model = _sharded_model()
    opt = Gefen(model.parameters(), lr=LR)
    # torch's helper runs a zero-gradient, lr = 0 step on an optimizer without state.
    helper_state = get_optimizer_state_dict(model, opt, options=_HELPER_OPTIONS)
    materialising_step_learned_nothing = opt.codebook is None and not opt.state
    template = {"model": model.state_dict(),
                "optim": helper_state if via == "get_optimizer_state_dict" else opt.state_dict()}
    dcp.load(template, checkpoint_id=checkpoint)
    model.load_state_dict(template["model"])
    if via == "get_optimizer_state_dict":
        set_optimizer_state_dict(model, opt, template["optim"], options=_HELPER_OPTIONS)
    else:
        opt.load_state_dict(template["optim"])
    losses = _train(model, opt, rank, range(CHECKPOINT_AT, FSDP_STEPS))
    return {
        "losses": losses,
        "params": _local_params(model),
        "state": _local_state(model, opt),
        "codebook": opt.codebook.clone(),
        "materialising_step_learned_nothing": materialising_step_learned_nothing,
    }


def _local_state(model: nn.Module, opt) -> dict[str, dict]:
    """The state of ``opt``'s parameters, by name."""
    mine = {id(p) for group in opt.param_groups for p in group["params"]}
    return {
        n: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for n, p in model.named_parameters() if id(p) in mine
    }


def _muon_ddp(rank: int) -> dict:
    model = DistributedDataParallel(make_model())
    opts = muon_optimizers(model.module)
    for step in range(DDP_STEPS):
        loss_of(model, *local_batch(step, rank)).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return {"params": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
            "codebook": opts[0].codebook.clone()}


def _muon_fsdp(rank: int, checkpoint: Path) -> dict:
    """GefenMuon + Gefen under FSDP2: training, the collectives of one GefenMuon step, a
    distributed checkpoint of both optimizers and its resumption in fresh ones."""
    model = _sharded_model()
    opts = muon_optimizers(model)
    losses = _train(model, opts, rank, range(CHECKPOINT_AT - 1))
    loss_of(model, *local_batch(CHECKPOINT_AT - 1, rank)).backward()
    with CommDebugMode() as comms:
        opts[0].step()
    opts[1].step()
    for opt in opts:
        opt.zero_grad()
    collectives = {str(op).rsplit(".", 1)[-1]: n for op, n in comms.get_comm_counts().items()}
    dcp.save({"model": model.state_dict(), "muon": opts[0].state_dict(),
              "rest": opts[1].state_dict()}, checkpoint_id=checkpoint)
    layout = {k: type(v).__name__ for k, v in opts[0].state_dict()["state"][0].items()}
    tail = _train(model, opts, rank, range(CHECKPOINT_AT, FSDP_STEPS))
    resumed_model = _sharded_model()
    resumed = muon_optimizers(resumed_model)
    template = {"model": resumed_model.state_dict(), "muon": resumed[0].state_dict(),
                "rest": resumed[1].state_dict()}
    dcp.load(template, checkpoint_id=checkpoint)
    resumed_model.load_state_dict(template["model"])
    resumed[0].load_state_dict(template["muon"])
    resumed[1].load_state_dict(template["rest"])
    return {
        "losses": losses, "tail": tail, "collectives": collectives, "layout": layout,
        "params": _local_params(model), "state": _local_state(model, opts[0]),
        "codebook": opts[0].codebook.clone(),
        "resumed_tail": _train(resumed_model, resumed, rank, range(CHECKPOINT_AT, FSDP_STEPS)),
        "resumed_params": _local_params(resumed_model),
        "resumed_state": _local_state(resumed_model, resumed[0]),
    }
