"""GefenMuon's momentum step of one parameter (muon.py): the C kernel on CPU, the Triton kernel
on CUDA, plain torch elsewhere (or without the C library). All give the same codes, magnitudes
and update bits."""

from __future__ import annotations

import torch

import ctypes

from ..codebook import NearestCode
from ..state import compute_dtype
from . import native, torch_step
from .cpu_step import DTYPE_CODES


def momentum_step(grad: torch.Tensor, codes: torch.Tensor, magnitude: torch.Tensor, *,
                  block: int, nearest: NearestCode, momentum: float,
                  nesterov: bool) -> torch.Tensor:
    """Update ``codes`` and ``magnitude`` (one parameter's flat state) from ``grad``
    (contiguous, the state's dtype) in place; return the update to orthogonalise (bfloat16,
    ``grad``'s shape)."""
    tables = nearest.tables(grad.device, compute_dtype(magnitude.dtype))
    if grad.device.type == "cpu" and native.library is not None:
        update = torch.empty(grad.shape, dtype=torch.bfloat16)
        args = native.MomentumArgs(
            grad.numel(), block, grad.data_ptr(), codes.data_ptr(), magnitude.data_ptr(),
            update.data_ptr(), momentum, int(nesterov), tables.codebook.data_ptr(),
            tables.lut.data_ptr(), tables.bounds.data_ptr(), tables.first_index.data_ptr(),
            tables.first_index.numel(), tables.half, torch.get_num_threads())
        if native.library.gefen_momentum(ctypes.byref(args), DTYPE_CODES[magnitude.dtype]):
            raise ValueError(f"gefen_momentum: block {block} or dtype {magnitude.dtype} refused")
        torch.autograd.graph.increment_version([codes, magnitude])
        return update
    return torch_step.momentum_update(grad, codes, magnitude, block=block,
                                      codebook=tables.codebook, nearest=nearest,
                                      momentum=momentum, nesterov=nesterov)
