"""GefenMuon's momentum step of one parameter (muon.py): the C kernel on CPU, the Triton kernel
on CUDA (kernels/triton_momentum.py), plain torch elsewhere (or without the C library or
Triton, and for fp64 on CUDA). All give the same codes, magnitudes and update bits (but for
NaN moments: the kernels leave them out of their block's magnitude, torch's amax spreads them)."""

from __future__ import annotations

import ctypes

import torch

from ..codebook import LookupTables
from . import native, torch_step
from .cpu_step import DTYPE_CODES

_triton_momentum = None  # the Triton module, imported at the first CUDA step; False: no Triton


def momentum_step(grad: torch.Tensor, codes: torch.Tensor, magnitude: torch.Tensor, *,
                  block: int, tables: LookupTables, momentum: float,
                  nesterov: bool) -> torch.Tensor:
    """Update ``codes`` and ``magnitude`` (one parameter's flat state) from ``grad``
    (contiguous, the state's dtype) in place; return the update to orthogonalise (bfloat16,
    ``grad``'s shape). ``tables``: the codebook's, on ``grad``'s device, in the compute dtype
    (``NearestCode.tables``). Called through ``ops.momentum_``, which torch.compile traces."""
    if grad.device.type == "cpu" and native.library is not None:
        _check(grad, codes, magnitude, block)
        update = torch.empty(grad.shape, dtype=torch.bfloat16, device="cpu")
        args = native.MomentumArgs(
            grad.numel(), block, grad.data_ptr(), codes.data_ptr(), magnitude.data_ptr(),
            update.data_ptr(), momentum, int(nesterov), tables.codebook.data_ptr(),
            tables.lut.data_ptr(), tables.bounds.data_ptr(), tables.first_index.data_ptr(),
            tables.first_index.numel(), tables.half, native.threads())
        if native.library.gefen_momentum(ctypes.byref(args), DTYPE_CODES[magnitude.dtype]):
            raise ValueError(f"gefen_momentum: block {block} or dtype {magnitude.dtype} refused")
        torch.autograd.graph.increment_version([codes, magnitude])
        native.log_rows()
        return update
    if grad.device.type == "cuda":
        kernel = _triton()
        if kernel is not None and kernel.supports(grad, block):
            _check(grad, codes, magnitude, block)
            update = kernel.momentum_step(grad, codes, magnitude, block=block, tables=tables,
                                          momentum=momentum, nesterov=nesterov)
            torch.autograd.graph.increment_version([codes, magnitude])
            return update
    if grad.device.type == "cpu":
        native.warn_missing()
    return torch_step.momentum_update(grad, codes, magnitude, block=block,
                                      codebook=tables.codebook, nearest=tables.codes,
                                      momentum=momentum, nesterov=nesterov)


def _triton():
    """kernels/triton_momentum.py, or None where Triton does not import."""
    global _triton_momentum
    if _triton_momentum is None:
        try:
            from . import triton_momentum
        except ImportError:
            triton_momentum = False
        _triton_momentum = triton_momentum
    return _triton_momentum or None


def _check(grad: torch.Tensor, codes: torch.Tensor, magnitude: torch.Tensor, block: int) -> None:
    """What the native kernels take on trust: dtypes, element counts, one device, contiguity."""
    n = grad.numel()
    problem = (
        "block must be at least 1" if block < 1
        else f"gradient {grad.dtype}, magnitude {magnitude.dtype}: they must match"
        if grad.dtype != magnitude.dtype
        else f"codes {codes.dtype}: they must be uint8" if codes.dtype != torch.uint8
        else f"{codes.numel()} codes for {n} elements" if codes.numel() != n
        else f"{magnitude.numel()} magnitudes for {-(-n // block)} blocks of {block}"
        if magnitude.numel() != -(-n // block)
        else "gradient, codes and magnitude on different devices"
        if not grad.device == codes.device == magnitude.device
        else "gradient, codes and magnitude must be contiguous"
        if not (grad.is_contiguous() and codes.is_contiguous() and magnitude.is_contiguous())
        else None
    )
    if problem:
        raise ValueError(f"GefenMuon momentum step: {problem}; pass the parameter's own state "
                         "(as GefenMuon keeps it) and a contiguous gradient of its dtype")
