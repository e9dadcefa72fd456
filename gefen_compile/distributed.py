"""Gefen under ``torch.distributed``: sharded (DTensor, FSDP2) parameters, the codebook learned
from every rank's shards, and a ``state_dict`` layout that ``torch.distributed.checkpoint``
saves and restores rank by rank.

DDP needs nothing from this module: gradients are all-reduced before ``step()``, so every rank
reads the same first gradients and learns the same periods and codebook on its own, and its
``state_dict()`` is the single-process one (the same on every rank: save it from one).

With DTensor parameters (``fully_shard``) Gefen works on each rank's local shard: periods are
inferred per local shard, blocks never straddle ranks, and the step is the single-process step
on local tensors. Only the codebook is global: the first step sums the shards' histograms
across the parameters' device mesh before the dynamic program, so every rank learns the same
one.

Checkpoint layout of a DTensor parameter's entry in ``Gefen.state_dict()["state"]`` (an
optimizer without DTensor parameters keeps the single-process layout, and one that mixes them
with plain parameters refuses to give a state_dict):

- ``codes``: uint8 DTensor with the parameter's mesh, placements and shape, so DCP stores each
  rank's piece once, like AdamW's ``exp_avg``;
- ``step``: float32 scalar tensor, equal on every rank (DCP saves it once); GefenMuon's entries
  have none;
- ``per_rank``: ``{"rank<r>": bytes}`` (r: global rank), this rank's ``torch.save`` of its
  period, magnitude, vmean (not GefenMuon's) and shard coordinates, the variant's name and the
  histogram of a provisional codebook (``codebook_histogram``, where the top level has one). Their sizes follow the period of this rank's
  shard, learned from its gradient, so no shape is known before loading; DCP restores a
  ``bytes`` value whole, without a preallocated tensor, and the rank in the key keeps DCP from
  deduplicating the ranks' records as if they were replicated. An empty record means "no state
  yet".

- ``codebook``: the global codebook again, as at the top level of the state_dict.

Every DTensor parameter has an entry, with or without state, and the codebook is a tensor (NaN
before it is learned): the ``state_dict()`` of a freshly built optimizer is then a complete
``dcp.load`` destination for resuming. A record is only valid on the mesh and shard it was saved
from: loading it elsewhere raises.

torch's helpers ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` /
``set_optimizer_state_dict`` work too, with their default options: they keep only the entries and
``param_groups`` (hence the codebook in every entry) and key the entries by parameter name.
``flatten_optimizer_state_dict=True`` makes torch refuse the ``bytes`` records (its error says so).
Their ``_init_optim_state`` calls ``step()`` on an optimizer without state, with every gradient
set to zeros and every ``lr`` to 0, to make AdamW allocate its state; such a step changes nothing
in AdamW, and Gefen learns nothing from it: no codebook, no period, no state (see
:func:`is_state_materialising_step`).
"""

from __future__ import annotations

import io
import logging
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .codebook import CODEBOOK_SIZE, NUM_BINS

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (a sharded or replicated parameter, its gradient)."""
    # Importing torch.distributed.tensor takes about a second, and no DTensor exists before
    # it is imported, so look it up rather than import it with gefen_compile.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local shard, or ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def local_grad(p: Tensor, g: Tensor, where: str) -> Tensor:
    """This rank's piece of ``p``'s gradient, laid out like its piece of ``p``."""
    if not is_sharded(g):
        return g
    if tuple(g.placements) != tuple(p.placements):
        raise ValueError(
            f"Gefen: the gradient of {where} has placements {g.placements}, the parameter "
            f"{p.placements}; Gefen updates each rank's shard from the matching shard of the "
            "reduced gradient: reduce it to the parameter's placements (fully_shard does) "
            "before step()"
        )
    return g.to_local()


def global_histogram(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rows: Sequence[int],
    negate: Sequence[bool],
) -> Tensor | None:
    """The codebook's histogram of first gradients (``grads``: local tensors of ``params``, cut
    into rows of ``rows[t]`` elements: see ops.histogram).

    Without DTensor parameters it is this process's histogram. With them, every piece of every
    parameter is counted once over the mesh (a rank counts a parameter only at coordinate 0 of
    the mesh dimensions it is not sharded over) and the counts are summed across the mesh, so
    every rank returns the same histogram. Every rank must call this together.
    """
    mesh = _common_mesh(params)
    if mesh is None:
        return ops.histogram(list(grads), list(rows), list(negate)) if grads else None
    counted = [i for i, p in enumerate(params) if _counted_here(p, mesh)]
    if counted:
        counts = ops.histogram([grads[i] for i in counted], [rows[i] for i in counted],
                               [negate[i] for i in counted])
    else:
        counts = torch.zeros(NUM_BINS, dtype=torch.int64, device=grads[0].device)
    # On the mesh's device type: CPU-offloaded shards (FSDP2 CPUOffloadPolicy) have CPU
    # gradients while NCCL reduces CUDA tensors only.
    counts = counts.to(mesh.device_type)
    # Summing over each mesh dimension in turn sums over the whole mesh (one call on 1-D).
    for dim in range(mesh.ndim):
        dist.all_reduce(counts, group=mesh.get_group(dim))
    return counts


def agreed_first_gradients(
    params: Sequence[Tensor], finite: Sequence[bool], nonzero: Sequence[bool],
    periods: Sequence[int],
) -> tuple[list[bool], list[bool], list[int]]:
    """Whether each parameter's first gradient is finite on every rank of the mesh of its
    DTensor shards, whether it is non-zero on any, and the largest period inferred from a
    non-zero shard of it on any rank (0 where none is) (``finite``, ``nonzero``, ``periods``:
    on this rank), in one collective: every rank then refuses the same step (none waits in a
    collective for a rank that raised), sets up the same parameters and learns the codebook
    at the same step, and a rank whose shard's gradient is all zero can take its period from
    the ranks that saw one. Every rank must call this together."""
    informed = [period if nz else 0 for period, nz in zip(periods, nonzero)]
    mesh = _common_mesh(params)
    if mesh is None:
        return list(finite), list(nonzero), informed
    count = len(finite)
    flags = torch.tensor([*(not f for f in finite), *nonzero, *informed], dtype=torch.int64)
    flags = flags.to(mesh.device_type)
    for dim in range(mesh.ndim):
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    values = flags.tolist()
    return ([not v for v in values[:count]], [bool(v) for v in values[count:2 * count]],
            values[2 * count:])


def is_state_materialising_step(groups: Sequence[dict], grads: Sequence[Tensor]) -> bool:
    """Whether the first gradients ``grads`` of parameters without state come from
    ``torch.distributed.checkpoint.state_dict._init_optim_state`` (read in torch 2.13): every
    ``lr`` is 0 and every such gradient is all zeros.

    That step exists to make AdamW allocate its state and changes no parameter; Gefen would
    read every period as 1 and a codebook from zeros, and keep them. Gefen leaves those
    parameters without state instead. The lr test comes first, so the gradients are only read
    (a host sync) when every lr is 0. A tensor lr is read only in an eager step (the helpers
    step eagerly; in a traced step, reading it would break the graph, with dynamo's warning).
    """
    return all(_is_zero_lr(group["lr"]) for group in groups) and not any(
        bool(g.any()) for g in grads
    )


def _is_zero_lr(lr: Any) -> bool:
    if isinstance(lr, Tensor):
        return not torch.compiler.is_compiling() and bool(lr == 0)
    return float(lr) == 0.0


def warn_unloadable(params: Sequence[Tensor], owner: str) -> None:
    """After :func:`is_state_materialising_step` skipped ``params``: where some are plain
    tensors, not DTensors, say that a ``dcp.load`` through torch's helpers restores nothing
    into them (their state's sizes come from the first real step, so the destination that the
    helpers build holds no entry for them), where AdamW's would be restored."""
    plain = sum(not is_sharded(p) for p in params)
    if plain:
        logging.getLogger("gefen_compile").warning(
            "%s: torch.distributed.checkpoint.state_dict's helpers ran their zero-gradient, "
            "lr = 0 step to allocate state for %d parameters that are not DTensors; %s's state "
            "sizes come from its first real step, so it allocates none, and a dcp.load into "
            "this optimizer's state_dict restores no optimizer state for them (their moments "
            "start anew): checkpoint it with torch.save(optimizer.state_dict()) and "
            "optimizer.load_state_dict(torch.load(...)) instead", owner, plain, owner)


def sharded_state_dict(params: Sequence[Tensor], state_dict: dict[str, Any], owner: str,
                       with_step: bool = True) -> dict[str, Any]:
    """``state_dict`` (an ``Optimizer.state_dict()`` plus ``"codebook"``, over ``params`` in
    index order) in the layout of this module's docstring; unchanged without DTensors.
    ``owner``: the optimizer's class name, for errors; ``with_step``: whether entries have a
    step counter (GefenMuon's have none)."""
    if not any(is_sharded(p) for p in params):
        return state_dict
    _require_all_sharded(params, owner)
    rank = dist.get_rank()
    codebook = state_dict["codebook"]
    if codebook is None:  # a destination dcp.load can fill, unlike None
        codebook = torch.full((CODEBOOK_SIZE,), math.nan, dtype=torch.float32)
    state = dict(state_dict["state"])
    kept = {k: state_dict[k] for k in _KEPT_IN_RECORDS if state_dict.get(k) is not None}
    for i, p in enumerate(params):
        state[i] = _checkpoint_entry(p, state.get(i), rank, codebook, kept, with_step)
    return {**state_dict, "state": state, "codebook": codebook}


def local_state_dict(params: Sequence[Tensor], state_dict: dict[str, Any], owner: str,
                     variant: str) -> dict[str, Any]:
    """The inverse of :func:`sharded_state_dict`: per-parameter entries in the single-process
    layout, holding this rank's local state, and the top-level codebook, variant and
    histogram (taken from the entries and records where torch's state_dict helpers dropped
    them; ``variant``, the loading optimizer's, where no record names one). ``owner``: as
    there."""
    if not any(is_sharded(p) for p in params):
        return state_dict
    # Saved keys are matched to parameters by position, as Optimizer.load_state_dict does;
    # they are indices, or names when the state_dict went through torch's state_dict helpers.
    saved_keys = [k for group in state_dict["param_groups"] for k in group["params"]]
    param_of = dict(zip(map(_index_or_name, saved_keys), params))
    rank = dist.get_rank()
    state, codebooks, kept = {}, [], {}
    for key, entry in _restored_entries(state_dict["state"]).items():
        if "per_rank" not in entry:
            raise ValueError(
                f"{owner}.load_state_dict: the entry of parameter {key} has no per-rank record, so "
                "it was saved by an optimizer over plain (unsharded) parameters; Gefen's state "
                "follows each rank's shard: resume a sharded run from a sharded checkpoint"
            )
        codebooks.append(entry["codebook"])
        record = entry["per_rank"].get(f"rank{rank}")
        if record is None:
            raise ValueError(
                f"{owner}.load_state_dict: the entry of parameter {key} has no record for rank "
                f"{rank}; it was saved on another mesh. Gefen's state follows each "
                "rank's shard: resume on the same device mesh"
            )
        if record:
            state[key], record_kept = _local_entry(param_of[key], entry, record, key, owner)
            kept = {**record_kept, **kept}
    codebook = state_dict["codebook"] if "codebook" in state_dict else next(iter(codebooks), None)
    if codebook is not None and bool(codebook.isnan().all()):
        codebook = None
    local_dict = {**state_dict, "state": state}
    if "codebook" in state_dict or codebooks:
        local_dict["codebook"] = codebook
    return {"variant": variant, **kept, **local_dict}


def _index_or_name(key: int | str) -> int | str:
    return int(key) if isinstance(key, str) and key.isdigit() else key


def _restored_entries(state: dict) -> dict[int | str, dict]:
    """``state`` keyed as saved again. dcp.load writes the tensors it restores into the
    destination's tensors, but puts a restored ``bytes`` value at a path of str keys (its
    flattening stringifies dict keys), beside an int-keyed entry: ``{3: {codes, step,
    per_rank: {rank0: b""}}, "3": {per_rank: {rank0: b"..."}}}``. The str-keyed values are
    the restored ones."""
    merged: dict[int | str, dict] = {}
    for key in sorted(state, key=lambda k: isinstance(k, str)):  # int keys first
        merged.setdefault(_index_or_name(key), {}).update(state[key])
    return merged


def _checkpoint_entry(p: Tensor, entry: dict | None, rank: int, codebook: Tensor,
                      kept: dict[str, Any], with_step: bool) -> dict[str, Any]:
    shard = local(p)
    if entry is None:
        codes = torch.zeros(shard.shape, dtype=torch.uint8, device=shard.device)
        step, record = torch.zeros((), dtype=torch.float32), b""
    else:
        codes, step = entry["codes"].view(shard.shape), entry.get("step")
        buffer = io.BytesIO()
        # And the top-level values that torch's helpers drop (_KEPT_IN_RECORDS): a record is
        # restored whole, whatever it holds.
        torch.save({"period": entry["period"], "shard": _shard_id(p),
                    **{k: entry[k].cpu() for k in _RECORDED if k in entry}, **kept}, buffer)
        record = buffer.getvalue()
    codes = type(p).from_local(codes, p.device_mesh, p.placements, run_check=False,
                               shape=p.shape, stride=p.stride())
    # The codebook in every entry too: torch's get_optimizer_state_dict keeps only the entries
    # and the param groups. DCP saves one copy of each (1 KiB per parameter).
    saved = {"codes": codes, "per_rank": {f"rank{rank}": record}, "codebook": codebook}
    return {**saved, "step": step} if with_step else saved


def _local_entry(p: Tensor, entry: dict, record: bytes, key: Any,
                 owner: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A parameter's local state from its entry and this rank's record, and the top-level
    values the record keeps."""
    saved = torch.load(io.BytesIO(record), weights_only=True)
    if saved["shard"] != _shard_id(p):
        raise ValueError(
            f"{owner}.load_state_dict: parameter {key} was saved as shard {saved['shard']} (mesh "
            f"shape, coordinate, local shape, placements) and is now {_shard_id(p)}; Gefen's "
            "periods and blocks belong to each rank's shard: resume on the same mesh and sharding"
        )
    restored = {"codes": local(entry["codes"]).reshape(-1), "period": saved["period"],
                **{k: saved[k] for k in _RECORDED if k in saved}}
    if "step" in entry:
        restored["step"] = entry["step"]
    return restored, {k: saved[k] for k in _KEPT_IN_RECORDS if k in saved}


# The state_dict key of a provisional codebook's histogram (learned_state.py).
HISTOGRAM = "codebook_histogram"
# Top-level values that records keep too (the codebook is kept in every entry).
_KEPT_IN_RECORDS = ("variant", HISTOGRAM)

# State tensors whose size follows this rank's period: saved in its record.
_RECORDED = ("magnitude", "vmean")


def _shard_id(p: Tensor) -> tuple:
    """What a rank's record is only valid for: mesh shape, this rank's coordinate, its shard's
    shape, and the parameter's placements."""
    mesh = p.device_mesh
    # Placements by class and dim: their str() differs between torch releases.
    placements = tuple((type(pl).__name__, getattr(pl, "dim", None)) for pl in p.placements)
    return (tuple(mesh.shape), tuple(mesh.get_coordinate()), tuple(local(p).shape), placements)


def _common_mesh(params: Sequence[Tensor]) -> DeviceMesh | None:
    """The device mesh of the DTensor parameters (None when there are none)."""
    meshes = {p.device_mesh for p in params if is_sharded(p)}
    if len(meshes) > 1:
        raise NotImplementedError(
            f"Gefen: the parameters are DTensors on {len(meshes)} device meshes; the codebook is "
            "global and Gefen sums its histogram over one mesh: shard every parameter of this "
            "optimizer over the same mesh, or use one optimizer per mesh"
        )
    return next(iter(meshes), None)


def _counted_here(p: Tensor, mesh: DeviceMesh) -> bool:
    """Whether this rank counts ``p`` in the global histogram: once per distinct piece."""
    coordinate = mesh.get_coordinate()
    placements = p.placements if is_sharded(p) else [None] * mesh.ndim
    return all(c == 0 for c, pl in zip(coordinate, placements) if pl is None or not pl.is_shard())


def _require_all_sharded(params: Sequence[Tensor], owner: str) -> None:
    for i, p in enumerate(params):
        if not is_sharded(p):
            raise NotImplementedError(
                f"{owner}.state_dict: parameter {i} is a plain tensor beside DTensor parameters; "
                "a distributed checkpoint could not restore its state into a fresh optimizer. "
                "Apply fully_shard to the module holding it (or to the root module) so that every "
                "parameter is a DTensor"
            )
