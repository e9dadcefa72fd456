"""Gefen's per-parameter state (GEFEN_SPEC "State per parameter") and what it costs.

Keys of ``optimizer.state[p]``, a stable checkpoint format:

- ``codes``: uint8, one per element, index into the global codebook;
- ``magnitude``: state dtype, one per magnitude block (the period, or Q for period 1);
- ``vmean``: state dtype, one per period block (one per element for period 1);
- ``step``: float32 scalar tensor, as AdamW keeps it (on the parameter's device when capturable);
- ``period``: int.

The state dtype is the gradient's dtype.
"""

from __future__ import annotations

import torch

from .partition import magnitude_block

TENSOR_KEYS = ("codes", "magnitude", "vmean", "step")
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def compute_dtype(state_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the update math: fp32, or fp64 for fp64 state."""
    return torch.float64 if state_dtype == torch.float64 else torch.float32


def new_state(grad: torch.Tensor, period: int, capturable: bool) -> dict:
    """Zero state for a parameter whose first gradient is ``grad`` and period is ``period``."""
    n = grad.numel()
    if n % period:
        raise ValueError(f"period {period} does not divide the parameter's {n} elements")
    dtype, device = grad.dtype, grad.device
    vmean_len = n // period if period > 1 else n
    return {
        "step": torch.zeros((), dtype=torch.float32, device=device if capturable else "cpu"),
        "period": period,
        "codes": torch.zeros(n, dtype=torch.uint8, device=device),
        "magnitude": torch.zeros(n // magnitude_block(n, period), dtype=dtype, device=device),
        "vmean": torch.zeros(vmean_len, dtype=dtype, device=device),
    }


def state_nbytes(state: dict) -> int:
    """Bytes held by one parameter's state tensors."""
    return sum(state[k].nbytes for k in TENSOR_KEYS if k in state)


def adamw_state_nbytes(param: torch.Tensor) -> int:
    """Bytes AdamW (amsgrad off) allocates for ``param``: exp_avg, exp_avg_sq and step."""
    return 2 * param.nbytes + torch.zeros((), dtype=torch.float32).nbytes
