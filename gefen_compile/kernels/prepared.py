"""The steady-state eager step's per-tensor host work, for CPU and CUDA buckets alike, in one C
call (``step_tables`` in cpu_step.c): each parameter's gradient read and checked, and the
pointer tables filled, where Python would make about twenty method calls per tensor. On the
CPU the C step reads those tables; on CUDA the Triton launcher makes its device tables from
them. Buckets the C call cannot vouch for take the general path (``ops.run_step``)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import StepInputs, cpu_step, is_readable, readable, tensor_shim
from ..state import Bucket
from .native import _cpu, library as _lib


class Prepared(NamedTuple):
    """What :func:`prepare` hands to :func:`run_prepared`."""

    grads: list[torch.Tensor | None]  # read from the parameters: held until the step is done
    copies: dict[int, torch.Tensor]  # contiguous copies stepped for bucket.params[i]
    layout: torch.Tensor | None  # the C step's StepArgs.layout: channels_last parameters


# The largest output channel or row the C step steps in a channels_last parameter's own memory
# (cpu_step.c, CHUNK_ELEMENTS); larger ones take copies.
CHANNELS_LAST_MAX = 65536


def prepare(bucket: Bucket) -> Prepared | None:
    """Fills ``bucket``'s host tables. Returns the gradients read, which the caller holds until
    :func:`run_prepared` is done with them (none where no parameter has a gradient), with what
    stands for the parameters stored apart (``Bucket.copied``): on the CPU, channels_last
    weights that the C step reads in their own memory (``in_own_memory``), else contiguous
    copies, written back after the step; or None, having done
    nothing, where the general path must run: no C library, neither on the CPU nor on CUDA,
    DTensor shards, under torch.compile (which traces ops.step_), or a tensor the general path
    must convert or name in an error."""
    if (_lib is None or bucket.sharded or bucket.codes.device.type not in RUNNERS
            or torch.compiler.is_compiling()):
        return None
    params, copies, layout = bucket.params, {}, None
    if bucket.copied:
        params = list(params)
        for i in bucket.copied:
            p, g = params[i], params[i].grad
            if g is None or is_readable(p):
                continue
            if (g.layout, g.dtype, g.shape, g.device) != (torch.strided, p.dtype, p.shape, p.device):
                return None  # the general path converts it, or names it in its error
            if in_own_memory(p, g, bucket, i):
                # the C step reads it in its own order (views in it: the step_tables' checks and
                # version bump reach the parameter itself)
                if layout is None:
                    layout = torch.zeros(len(params), 2, dtype=torch.int64)
                layout[i, 0], layout[i, 1] = p.shape[1], math.prod(p.shape[2:])
                order = (0, *range(2, p.dim()), 1)  # the memory's order: channels last
                params[i] = p.detach().permute(order)
                params[i].grad = g.permute(order)
            else:
                params[i] = copies[i] = readable(p.detach())
                copies[i].grad = readable(g)
    status, grads = fill_tables(bucket, params)
    if status >= 0:
        return None
    return Prepared(grads if status == -1 else [], copies, layout)


def in_own_memory(p: torch.Tensor, g: torch.Tensor, bucket: Bucket, i: int) -> bool:
    """Whether the C step can step ``p``, parameter i of a CPU bucket, and its gradient ``g``,
    both stored channels_last (2-d convolutions' weights; channels_last_3d for 3-d ones; not
    negated, aligned), in their own memory (StepArgs.layout): whole output channels and whole
    rows of at most CHANNELS_LAST_MAX elements, one a multiple of the other. (A CUDA bucket's
    row lengths are not read: that would wait for the GPU.)"""
    stored = {4: torch.channels_last, 5: torch.channels_last_3d}.get(p.dim())
    if p.device.type != "cpu" or stored is None or not all(
            t.is_contiguous(memory_format=stored) and not t.is_neg()
            and t.data_ptr() % t.element_size() == 0 for t in (p, g)):
        return False
    unit, block = math.prod(p.shape[1:]), bucket.blocks()[i]
    return (max(unit, block) <= CHANNELS_LAST_MAX and 0 < block
            and (unit % block == 0 or block % unit == 0))


def run_prepared(bucket: Bucket, prepared: Prepared, args: StepInputs) -> None:
    """The step of a bucket whose tables :func:`prepare` filled; ``args``: its ops.step_
    arguments (their lists of params and grads are not read). The copies stepped are written
    back to their parameters."""
    RUNNERS[bucket.codes.device.type](args, *bucket.host_tables(), prepared.layout)
    torch.autograd.graph.increment_version(bucket.written_state())
    for i, copy in prepared.copies.items():
        bucket.params[i].copy_(copy)


def fill_tables(bucket: Bucket, params: list[torch.Tensor] | None = None
                ) -> tuple[int, list[torch.Tensor | None]]:
    """Fill the bucket's host tables (``Bucket.host_tables``) from its parameters (or
    ``params`` standing for them) and their gradients in one C call. Returns its status (-1
    when they are ready, -2 when no parameter has a gradient, else the index of the first
    parameter the general path must look at) and the gradients it read, which the caller holds
    until the kernel has read their memory (on CUDA, until the launch is queued: the caching
    allocator reuses freed memory on its stream only after the kernels queued there)."""
    params = bucket.params if params is None else params
    grads: list[torch.Tensor | None] = [None] * len(params)
    device = bucket.codes.device
    index = -1 if device.index is None else device.index
    status = _cpu.step_tables(params, bucket.numels, device,
                              tensor_shim.device_codes.get(device.type, -1), index, bucket.dtype,
                              tensor_shim.codes.get(bucket.dtype, -1), bucket.dtype.itemsize, grads,
                              *(t.data_ptr() for t in bucket.host_tables()))
    return status, grads


def _run_cuda(args: StepInputs, params: torch.Tensor, grads: torch.Tensor,
              has_grad: torch.Tensor, layout: None) -> None:
    """``layout``: None (prepare steps channels_last parameters in their own memory only on the
    CPU)."""
    assert layout is None, "the Triton step reads parameters in logical order only"
    from . import triton_step  # triton is only needed where CUDA is

    triton_step.step_from_tables(args, params, grads, has_grad)


# The step on filled tables, by device type (the C step on the CPU, the Triton launcher on CUDA).
RUNNERS = {"cpu": cpu_step._run, "cuda": _run_cuda}
