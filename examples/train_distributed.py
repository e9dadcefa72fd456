"""Gefen with DDP or FSDP2 (fully_shard): a byte-level language model on standard-library text.

    torchrun --nproc_per_node 2 examples/train_distributed.py --mode ddp
    torchrun --nproc_per_node 2 examples/train_distributed.py --mode fsdp
    torchrun --nproc_per_node 2 examples/train_distributed.py --mode fsdp --checkpoint /tmp/ckpt

gloo on CPU, NCCL when every rank has a GPU. Each rank draws its own batches (data parallel);
rank 0 prints the loss averaged over ranks, and at the end checks that every rank holds the same
codebook.

- ddp: ``DistributedDataParallel`` all-reduces gradients before ``step()``, so every rank learns
  the same periods and codebook and takes the same step; nothing Gefen-specific is needed.
- fsdp: every ``nn.Linear`` and the root are ``fully_shard``-ed, parameters are DTensors and
  Gefen keeps state for each rank's shard only: periods are inferred per local shard and the
  first step sums the codebook histogram over the ranks.

``--checkpoint DIR`` saves after training; run the same command again to resume from it
(bit-identical to one longer run):

- fsdp: ``{"model": model.state_dict(), "optim": optimizer.state_dict()}`` with
  ``torch.distributed.checkpoint``, each rank writing its shards; resume on the same number of
  ranks (Gefen's state follows each rank's shard). A freshly built optimizer's ``state_dict()``
  is the ``dcp.load`` destination. (``torch.distributed.checkpoint.state_dict``'s
  ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` work too, with their default
  options.)
- ddp: every rank holds the same state, so rank 0 writes the single-process ``state_dict()``
  with ``torch.save`` and every rank loads it. (``dcp.load`` cannot fill a fresh optimizer
  here: the sizes of plain parameters' state depend on periods learned at the first step.)
"""

from __future__ import annotations

import argparse
import gc
import os
import sysconfig
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from gefen_compile import Gefen

CONTEXT = 8
EMBED_DIM = 32
HIDDEN = 256
BATCH_SIZE = 64  # per rank
LOG_EVERY = 50


def corpus() -> torch.Tensor:
    """The bytes of a standard-library module: text every CPython installation has."""
    path = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()


def make_model() -> nn.Module:
    """Embed the last CONTEXT bytes, an MLP, logits for the next byte. Same seed on every rank."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(256, EMBED_DIM),
        nn.Flatten(),
        nn.Linear(CONTEXT * EMBED_DIM, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, 256),
    )


def parallelise(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    model.to(device)
    if mode == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.Embedding)):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def save_checkpoint(path: Path, mode: str, model: nn.Module, optimizer: Gefen, step: int) -> None:
    state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}
    if mode == "fsdp":
        dcp.save(state, checkpoint_id=path)
    elif dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(state, path / "ddp.pt")
    dist.barrier()  # nobody resumes from a half-written checkpoint


def load_checkpoint(path: Path, mode: str, model: nn.Module, optimizer: Gefen) -> int:
    """Restore ``model`` and ``optimizer``; returns the step to continue from."""
    if mode == "fsdp":
        state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": 0}
        dcp.load(state, checkpoint_id=path)
    else:
        device = next(model.parameters()).device
        state = torch.load(path / "ddp.pt", map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    return state["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("ddp", "fsdp"), required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--checkpoint", type=Path,
                        help="save here after training; resume from it if present")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)

    model = parallelise(make_model(), args.mode, device)
    optimizer = Gefen(model.parameters(), lr=args.lr)
    first_step = 0
    if args.checkpoint is not None and args.checkpoint.exists():
        first_step = load_checkpoint(args.checkpoint, args.mode, model, optimizer)

    data = corpus()
    windows = data.unfold(0, CONTEXT + 1, 1)
    for step in range(first_step, first_step + args.steps):
        # Each rank its own batch, a function of the step: a resumed run sees the same batches.
        generator = torch.Generator().manual_seed(step * world + rank)
        rows = windows[torch.randint(len(windows), (BATCH_SIZE,), generator=generator)].to(device)
        loss = nn.functional.cross_entropy(model(rows[:, :-1]), rows[:, -1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % LOG_EVERY == 0 or step == first_step + args.steps - 1:
            loss = loss.detach()
            dist.all_reduce(loss)
            if rank == 0:
                print(f"step {step:5d}  loss {loss.item() / world:.4f}")

    codebooks = [torch.empty(256) for _ in range(world)]
    dist.all_gather_object(codebooks, optimizer.codebook)
    if rank == 0:
        same = all(torch.equal(c, codebooks[0]) for c in codebooks)
        print(f"{args.mode}: {world} ranks, one codebook on every rank: {same}")
    if args.checkpoint is not None:
        save_checkpoint(args.checkpoint, args.mode, model, optimizer, first_step + args.steps)
        if rank == 0:
            print(f"saved {args.checkpoint}")
    # The model's hooks (DDP's reducer, FSDP's collectives) gone on every rank before any
    # closes its connections, as tests/distributed_workers.py does: a rank closing while its
    # peer still holds them can leave that peer waiting.
    del model, optimizer
    gc.collect()  # DDP's hooks hold its model in a reference cycle
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
