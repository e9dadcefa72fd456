"""Gefen's state (GEFEN_SPEC "State per parameter"): flat buffers per (device, dtype), seen
per parameter through views.

Keys of ``optimizer.state[p]``, a stable checkpoint format:

- ``codes``: uint8, one per element, index into the global codebook;
- ``magnitude``: state dtype, one per magnitude block (the period; for period 1, the
  variant's block, whose last block may be shorter: variant.py);
- ``vmean``: state dtype, one per period block (one per element for period 1);
- ``step``: float32 scalar tensor on the parameter's device;
- ``period``: int.

The state dtype is the gradient's dtype. Every parameter of one (device, state dtype) lives in
one :class:`Bucket`: its codes, magnitudes, second moments and step counters are slices of four
flat buffers. A kernel works on *rows*, one per magnitude block, numbered across the bucket;
a small table of *segments*, one per parameter, tells where each parameter's rows begin and where
its state lives, so one launch updates every parameter of every group with metadata that grows
with the number of parameters, not their size. Each parameter's codes and second moments begin
at a multiple of 16 elements, so that kernels can read them with 128-bit accesses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .variant import Variant

TENSOR_KEYS = ("codes", "magnitude", "vmean", "step")
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Columns of Bucket.segments: the parameter's first row (rows are numbered like magnitudes: one
# each), row length (its magnitude block; the last row holds what remains of the parameter's
# elements, fewer where the block does not divide them), where its codes and second moments
# begin, whether it keeps one second moment per element (period 1) or one per row, and its
# number of elements.
SEG_ROW0, SEG_BLOCK, SEG_CODE, SEG_V, SEG_V_PER_ELEMENT, SEG_NUMEL = range(6)
SEG_FIELDS = 6
# Codes and second moments of each parameter start at a multiple of this many elements.
STATE_ALIGN = 16


def compute_dtype(state_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the update math: fp32, or fp64 for fp64 state."""
    return torch.float64 if state_dtype == torch.float64 else torch.float32


def state_sizes(numel: int, period: int, variant: Variant,
                second_moments: bool = True) -> tuple[int, int]:
    """(magnitude length, vmean length) of a parameter; GefenMuon keeps no second moments."""
    vmean = (numel // period if period > 1 else numel) if second_moments else 0
    return -(-numel // variant.magnitude_block(numel, period)), vmean


@dataclass
class Bucket:
    """Every parameter of one (device, state dtype): flat state buffers and their row table."""

    params: list[torch.Tensor]  # the tensors the kernels update: local shards of DTensors
    owners: list[torch.Tensor]  # the optimizer's parameters, holding .grad and keying the state
    param_group: torch.Tensor  # int64, group index per parameter
    codes: torch.Tensor  # uint8
    magnitude: torch.Tensor
    vmean: torch.Tensor
    steps: torch.Tensor  # float32, per parameter
    segments: torch.Tensor  # int64 [parameters, SEG_FIELDS]
    num_rows: int
    numels: list[int]  # elements of each parameter, as its state was built
    sharded: bool  # whether params are local shards of the owners (DTensors)
    # Parameters the kernels cannot update in place (channels_last, negated, misaligned), as
    # the general path last found them: the prepared step steps contiguous copies of these.
    copied: tuple[int, ...] = ()
    _work: tuple | None = field(default=None, repr=False)
    _host: tuple | None = field(default=None, repr=False)
    _written: list | None = field(default=None, repr=False)
    _blocks: list | None = field(default=None, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.vmean.dtype

    def work_plan(self) -> tuple[list[torch.Tensor], list[int]]:
        """The CUDA kernel's work tables and classes (kernels/work_plan.py), built once."""
        if self._work is None:
            from .kernels.work_plan import work_plan

            self._work = work_plan(self.segments, [p.numel() for p in self.params])
        return self._work

    def blocks(self) -> list[int]:
        """Each parameter's block (magnitude row) length, read once from the segment table."""
        if self._blocks is None:
            self._blocks = self.segments[:, SEG_BLOCK].tolist()
        return self._blocks

    def host_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The steady step's host tables, refilled each step (kernels/prepared.py): data
        pointers of the parameters and of their gradients (int64), which have one (uint8)."""
        if self._host is None:
            n = len(self.params)
            self._host = tuple(torch.zeros(n, dtype=d, device="cpu")
                               for d in (torch.int64, torch.int64, torch.uint8))
        return self._host

    def written_state(self) -> list[torch.Tensor]:
        """The state a step writes, whose version counters it bumps (kernels/prepared.py; the
        parameters' are bumped as their tables are filled)."""
        if self._written is None:
            self._written = [self.codes, self.magnitude, self.vmean, self.steps]
        return self._written


def build_bucket(
    params: list[torch.Tensor],
    groups: list[int],
    states: list[dict],
    dtype: torch.dtype,
    variant: Variant,
    owners: list[torch.Tensor] | None = None,
    second_moments: bool = True,
) -> Bucket:
    """Allocate one bucket for ``params`` (their ``states`` hold at least ``period``), copy any
    existing state tensors in, and point every ``states[i]`` entry at its slice. ``owners``:
    the optimizer's parameters when ``params`` are their local shards. Without
    ``second_moments`` (GefenMuon's momentum) the entries get codes and magnitudes only, and
    ``vmean`` and ``steps`` are empty."""
    device = params[0].device
    sizes = [(p.numel(), s["period"]) for p, s in zip(params, states)]
    lengths = [(n, *state_sizes(n, period, variant, second_moments)) for n, period in sizes]
    codes = torch.zeros(sum(_aligned(n) for n, _, _ in lengths), dtype=torch.uint8, device=device)
    magnitude = torch.zeros(sum(m for _, m, _ in lengths), dtype=dtype, device=device)
    vmean = torch.zeros(sum(_aligned(v) for _, _, v in lengths), dtype=dtype, device=device)
    steps = torch.zeros(len(params) if second_moments else 0, dtype=torch.float32, device=device)
    segments = torch.zeros(len(params), SEG_FIELDS, dtype=torch.int64, device="cpu")
    c0 = m0 = v0 = 0
    for i, (state, (n, m, v), (_, period)) in enumerate(zip(states, lengths, sizes)):
        views = {"codes": codes[c0 : c0 + n], "magnitude": magnitude[m0 : m0 + m]}
        if second_moments:
            views.update(vmean=vmean[v0 : v0 + v], step=steps[i])
        for key, view in views.items():
            if key in state:
                view.copy_(state[key].reshape(view.shape))
            dict.__setitem__(state, key, view)  # the bucket's own views: no change to report
        block = variant.magnitude_block(n, period)
        segments[i] = torch.tensor([m0, block, c0, v0, int(period == 1), n], device="cpu")
        c0, m0, v0 = c0 + _aligned(n), m0 + m, v0 + _aligned(v)
    return Bucket(
        params=list(params),
        owners=list(params if owners is None else owners),
        param_group=torch.tensor(groups, dtype=torch.int64, device=device),
        codes=codes,
        magnitude=magnitude,
        vmean=vmean,
        steps=steps,
        segments=segments.to(device),
        num_rows=m0,
        numels=[n for n, _ in sizes],
        sharded=owners is not None and any(o is not p for o, p in zip(owners, params)),
    )


def _aligned(length: int) -> int:
    """``length`` rounded up to a multiple of STATE_ALIGN."""
    return -(-length // STATE_ALIGN) * STATE_ALIGN


def state_nbytes(state: dict) -> int:
    """Bytes held by one parameter's state tensors."""
    return sum(state[k].nbytes for k in TENSOR_KEYS if k in state)


def adamw_state_nbytes(param: torch.Tensor) -> int:
    """Bytes AdamW (amsgrad off) allocates for ``param``: exp_avg, exp_avg_sq and step."""
    return 2 * param.nbytes + torch.zeros((), dtype=torch.float32).nbytes
