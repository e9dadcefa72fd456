"""Gefen's state (GEFEN_SPEC "State per parameter"): flat buffers per (device, dtype), seen
per parameter through views.

Keys of ``optimizer.state[p]``, a stable checkpoint format:

- ``codes``: uint8, one per element, index into the global codebook;
- ``magnitude``: state dtype, one per magnitude block (the period, or Q for period 1);
- ``vmean``: state dtype, one per period block (one per element for period 1);
- ``step``: float32 scalar tensor on the parameter's device;
- ``period``: int.

The state dtype is the gradient's dtype. Every parameter of one (device, state dtype) lives in
one :class:`Bucket`: its codes, magnitudes, second moments and step counters are slices of four
flat buffers, and a table of *rows* (one per magnitude block) tells a kernel where each block
is, so one launch updates every parameter of every group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .partition import magnitude_block

TENSOR_KEYS = ("codes", "magnitude", "vmean", "step")
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Columns of Bucket.rows.
ROW_PARAM, ROW_START, ROW_LEN, ROW_CODE, ROW_MAG, ROW_V, ROW_V_PER_ELEMENT = range(7)
ROW_FIELDS = 7


def compute_dtype(state_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the update math: fp32, or fp64 for fp64 state."""
    return torch.float64 if state_dtype == torch.float64 else torch.float32


def state_sizes(numel: int, period: int) -> tuple[int, int]:
    """(magnitude length, vmean length) of a parameter."""
    vmean = numel // period if period > 1 else numel
    return numel // magnitude_block(numel, period), vmean


@dataclass
class Bucket:
    """Every parameter of one (device, state dtype): flat state buffers and their row table."""

    params: list[torch.Tensor]
    param_group: torch.Tensor  # int64, group index per parameter
    codes: torch.Tensor  # uint8
    magnitude: torch.Tensor
    vmean: torch.Tensor
    steps: torch.Tensor  # float32, per parameter
    rows: torch.Tensor  # int64 [rows, ROW_FIELDS], one per magnitude block
    max_row_len: int

    @property
    def dtype(self) -> torch.dtype:
        return self.vmean.dtype


def build_bucket(
    params: list[torch.Tensor], groups: list[int], states: list[dict], dtype: torch.dtype
) -> Bucket:
    """Allocate one bucket for ``params`` (their ``states`` hold at least ``period``), copy any
    existing state tensors in, and point every ``states[i]`` entry at its slice."""
    device = params[0].device
    sizes = [(p.numel(), s["period"]) for p, s in zip(params, states)]
    lengths = [(n, *state_sizes(n, period)) for n, period in sizes]
    codes = torch.zeros(sum(n for n, _, _ in lengths), dtype=torch.uint8, device=device)
    magnitude = torch.zeros(sum(m for _, m, _ in lengths), dtype=dtype, device=device)
    vmean = torch.zeros(sum(v for _, _, v in lengths), dtype=dtype, device=device)
    steps = torch.zeros(len(params), dtype=torch.float32, device=device)
    row_tables = []
    c0 = m0 = v0 = 0
    for i, (state, (n, m, v), (_, period)) in enumerate(zip(states, lengths, sizes)):
        views = {
            "codes": codes[c0 : c0 + n],
            "magnitude": magnitude[m0 : m0 + m],
            "vmean": vmean[v0 : v0 + v],
            "step": steps[i],
        }
        for key, view in views.items():
            if key in state:
                view.copy_(state[key].reshape(view.shape))
            state[key] = view
        row_tables.append(_rows(i, n, period, c0, m0, v0))
        c0, m0, v0 = c0 + n, m0 + m, v0 + v
    rows = torch.cat(row_tables) if row_tables else torch.zeros(0, ROW_FIELDS, dtype=torch.int64)
    return Bucket(
        params=list(params),
        param_group=torch.tensor(groups, dtype=torch.int64, device=device),
        codes=codes,
        magnitude=magnitude,
        vmean=vmean,
        steps=steps,
        rows=rows.to(device),
        max_row_len=int(rows[:, ROW_LEN].max()) if len(rows) else 1,
    )


def _rows(index: int, numel: int, period: int, code0: int, mag0: int, v0: int) -> torch.Tensor:
    """Row table of one parameter: one row per magnitude block."""
    block = magnitude_block(numel, period)
    count = numel // block if numel else 0
    k = torch.arange(count, dtype=torch.int64)
    start = k * block
    rows = torch.empty(count, ROW_FIELDS, dtype=torch.int64)
    rows[:, ROW_PARAM] = index
    rows[:, ROW_START] = start
    rows[:, ROW_LEN] = block
    rows[:, ROW_CODE] = code0 + start
    rows[:, ROW_MAG] = mag0 + k
    # Period-1 tensors keep one second moment per element, the others one per row.
    rows[:, ROW_V] = v0 + (start if period == 1 else k)
    rows[:, ROW_V_PER_ELEMENT] = int(period == 1)
    return rows


def state_nbytes(state: dict) -> int:
    """Bytes held by one parameter's state tensors."""
    return sum(state[k].nbytes for k in TENSOR_KEYS if k in state)


def adamw_state_nbytes(param: torch.Tensor) -> int:
    """Bytes AdamW (amsgrad off) allocates for ``param``: exp_avg, exp_avg_sq and step."""
    return 2 * param.nbytes + torch.zeros((), dtype=torch.float32).nbytes
