"""The steady-state eager step's per-tensor host work, for CPU and CUDA buckets alike, in one C
call (``step_tables`` in cpu_step.c): each parameter's gradient read and checked, and the
pointer tables filled, where Python would make about twenty method calls per tensor. On the
CPU the C step reads those tables; on CUDA the Triton launcher makes its device tables from
them. Buckets the C call cannot vouch for take the general path (``ops.run_step``)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import StepInputs, cpu_step, is_readable, readable, tensor_shim
from ..state import Bucket
from .native import _cpu, library as _lib


class Prepared(NamedTuple):
    """What :func:`prepare` hands to :func:`run_prepared`."""

    grads: list[torch.Tensor | None]  # read from the parameters: held until the step is done
    copies: dict[int, torch.Tensor]  # contiguous copies stepped for bucket.params[i]


def prepare(bucket: Bucket) -> Prepared | None:
    """Fills ``bucket``'s host tables. Returns the gradients read, which the caller holds until
    :func:`run_prepared` is done with them (none where no parameter has a gradient), and the
    copies stepped for parameters stored apart (``Bucket.copied``); or None, having done
    nothing, where the general path must run: no C library, neither on the CPU nor on CUDA,
    DTensor shards, under torch.compile (which traces ops.step_), or a tensor the general path
    must convert or name in an error."""
    if (_lib is None or bucket.sharded or bucket.codes.device.type not in RUNNERS
            or torch.compiler.is_compiling()):
        return None
    params, copies = bucket.params, {}
    if bucket.copied:
        params = list(params)
        for i in bucket.copied:
            p, g = params[i], params[i].grad
            if g is None or is_readable(p):
                continue
            if (g.layout, g.dtype, g.shape, g.device) != (torch.strided, p.dtype, p.shape, p.device):
                return None  # the general path converts it, or names it in its error
            params[i] = copies[i] = readable(p.detach())
            copies[i].grad = readable(g)
    status, grads = fill_tables(bucket, params)
    if status >= 0:
        return None
    return Prepared(grads if status == -1 else [], copies)


def run_prepared(bucket: Bucket, prepared: Prepared, args: StepInputs) -> None:
    """The step of a bucket whose tables :func:`prepare` filled; ``args``: its ops.step_
    arguments (their lists of params and grads are not read). The copies stepped are written
    back to their parameters."""
    RUNNERS[bucket.codes.device.type](args, *bucket.host_tables())
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
              has_grad: torch.Tensor) -> None:
    from . import triton_step  # triton is only needed where CUDA is

    triton_step.step_from_tables(args, params, grads, has_grad)


# The step on filled tables, by device type (the C step on the CPU, the Triton launcher on CUDA).
RUNNERS = {"cpu": cpu_step._run, "cuda": _run_cuda}
