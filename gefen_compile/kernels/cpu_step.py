"""The fast CPU path: the C kernels of ``cpu_step.c`` called on tensors.

Each call hands the kernel raw data pointers of CPU tensors, so the caller keeps the tensors
alive and contiguous for the duration of the call. The kernels use ``native.threads()``
threads.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from ..codebook import NUM_BINS
from . import StepInputs, readable
from .native import StepArgs, library as _lib, log_rows, threads

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
# Whole rows (magnitude blocks) up to this long may be stepped in batches of rows (cpu_step.c,
# "short rows"; each path batches up to its own length, 32 or 64); 0 steps every row alone.
MAX_BATCHED_ROW = 64


def _pointers(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
    return torch.tensor([0 if t is None else t.data_ptr() for t in tensors], dtype=torch.int64,
                        device="cpu")


def step(*args) -> None:
    """One Gefen step of every row of a bucket, in place (the arguments of ops.step_)."""
    a = StepInputs(*args)
    _run(a, _pointers(a.params), _pointers(a.grads),
         torch.tensor([g is not None for g in a.grads], dtype=torch.uint8, device="cpu"))


def _run(a: StepInputs, params: torch.Tensor, grads: torch.Tensor, has_grad: torch.Tensor,
         layout: torch.Tensor | None = None) -> None:
    """The C step on ``a``, with its parameters' and gradients' data pointers (int64) and
    which have a gradient (uint8) in the tables given; ``layout``: int64 [parameters, 2], the
    channels and spatial size of those stored channels_last (0 0 for the others; see
    StepArgs.layout in cpu_step.c)."""
    if a.skip is not None and a.skip.item():
        return
    tensors = (params, grads, has_grad, a.param_group, a.hyper, a.codes, a.magnitude, a.vmean,
               a.steps, a.codebook, a.lut, a.bounds, a.first_index)
    args = StepArgs(a.num_rows, a.segments.data_ptr(), len(params),
                    *(t.data_ptr() for t in tensors), a.first_index.numel(), a.lut_half,
                    threads(), MAX_BATCHED_ROW, None if layout is None else layout.data_ptr())
    if _lib.gefen_step(ctypes.byref(args), DTYPE_CODES[a.vmean.dtype]) != 0:
        raise MemoryError("gefen_step: out of memory for its per-parameter scratch")
    log_rows()


def _gradient_tables(grads: Sequence[torch.Tensor], *more: Sequence[int]) -> tuple:
    """Data pointers, dtype codes and sizes of ``grads``, then each of ``more``, as int64."""
    return (
        _pointers(grads),
        torch.tensor([DTYPE_CODES[g.dtype] for g in grads], dtype=torch.int64, device="cpu"),
        torch.tensor([g.numel() for g in grads], dtype=torch.int64, device="cpu"),
        *(torch.tensor(list(m), dtype=torch.int64, device="cpu") for m in more),
    )


def histogram(
    grads: Sequence[torch.Tensor], rows: Sequence[int], negate: Sequence[bool]
) -> torch.Tensor:
    """int64 counts of every gradient's normalised rows (see codebook.gradient_histogram)."""
    grads = [readable(g) for g in grads]
    counts = torch.zeros(NUM_BINS, dtype=torch.int64, device="cpu")
    tables = _gradient_tables(grads, rows, negate)
    _lib.gefen_histogram(
        len(grads), *(t.data_ptr() for t in tables), counts.data_ptr(), threads()
    )
    return counts


def first_gradient_facts(
    grads: Sequence[torch.Tensor], candidates: Sequence[int], offsets: Sequence[int]
) -> torch.Tensor:
    """float64 finiteness, non-zero flags and candidate-period scores of every gradient, in one
    pass over each (see ops.first_gradient_facts)."""
    grads = [readable(g) for g in grads]
    out = torch.empty(2 * len(grads) + offsets[-1], dtype=torch.float64, device="cpu")
    tables = _gradient_tables(grads, offsets, candidates)
    status = _lib.gefen_first_gradient_facts(
        len(grads), *(t.data_ptr() for t in tables), out.data_ptr(), threads()
    )
    if status != 0:
        raise MemoryError("gefen_first_gradient_facts: out of memory for its per-candidate scratch")
    return out
