"""GefenMuon's momentum step of one parameter in Triton (CUDA; ``TRITON_INTERPRET=1`` runs it on
CPU tensors, which is how tests/test_triton_momentum.py checks it, and kernels/aot.py compiles it
for sm_80 and sm_90 without a GPU).

The arithmetic of kernels/torch_step.py ``momentum_update``, bit for bit: fp32, IEEE division,
no fused multiply-adds (launched with ``enable_fp_fusion=False``), bf16 rounded to nearest even
with NaN kept. A block's peak |m| ignores NaN moments, as the C rows (cpu_step.c) do, so CPU and
GPU agree there too (torch's ``amax`` would spread a NaN over its block).

One launch per parameter (Muon orthogonalises each matrix on its own), organised for bandwidth
as kernels/triton_step.py is: a program owns a contiguous run of whole rows (magnitude blocks),
found from its program id alone; it walks them in [ROWS, COLS] tiles, COLS the block rounded up
to a power of two (longer blocks loop over column chunks, reading the row twice), so short
blocks share a tile instead of masking lanes away. A ragged last row (shorter than the block)
is the last program's, through its own copy of the tile loop, so the full rows keep the
alignment the compiler needs for 128-bit accesses.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .triton_step import _TRITON_DTYPES, _div, _moment, _nearest, _table, _to_state
from .work_plan import ALIGN, ITEM_ELEMENTS, MAX_COLS, TILE, row_class

_ALIGN = tl.constexpr(ALIGN)
# Programs per SM a parameter is spread over when it is too small for ITEM_ELEMENTS each.
_PROGRAMS_PER_SM = 4
# Offsets inside a tile are 32-bit: a tile's rows of a block (one row, for column chunks) must
# fit, with room to spare; longer blocks take the torch path.
MAX_BLOCK = 2**30


@triton.jit
def _peak(m):
    """Each row's largest |m|, NaN left out (the C rows' ``mag > peak``), at least 0."""
    return tl.max(tl.where(m == m, tl.abs(m), 0.0), axis=1)


@triton.jit
def _quantise_and_emit(m, g, mask, offs, code_ptr, out_ptr, stored, beta, keep, codebook_ptr,
                       lut_ptr, bounds_ptr, first_ptr, half, NESTEROV: tl.constexpr):
    """New codes of ``m`` against its row's stored magnitude, and the bf16 update."""
    code = _nearest(_div(m, stored, tl.float32), lut_ptr, bounds_ptr, first_ptr, half)
    code = tl.where(stored > 0, code, 0)  # an all-zero row: code 0, as the spec asks
    tl.store(code_ptr + offs, code.to(tl.uint8), mask=mask)
    quantised = _table(codebook_ptr, code) * stored
    if NESTEROV:
        update = quantised * beta + g * keep
    else:
        update = quantised
    tl.store(out_ptr + offs, _to_state(update, tl.bfloat16), mask=mask)


@triton.jit
def _momentum_rows(grad_ptr, code_ptr, mag_ptr, out_ptr, row0, num_rows, length, beta, keep,
                   codebook_ptr, lut_ptr, bounds_ptr, first_ptr, half, DTYPE: tl.constexpr,
                   ROWS: tl.constexpr, COLS: tl.constexpr, MULTI: tl.constexpr,
                   NESTEROV: tl.constexpr):
    """Rows ``row0 .. row0 + num_rows`` of ``length`` elements each."""
    cols = tl.arange(0, COLS)
    lanes = tl.arange(0, ROWS)
    local = lanes[:, None] * length + cols[None, :]  # 32-bit offsets inside a tile
    for t in range(0, num_rows, ROWS):
        first = row0 + t
        start = first * length  # 64-bit: a parameter may pass 2**31 elements
        g_ptr = grad_ptr + start
        c_ptr = code_ptr + start
        o_ptr = out_ptr + start
        if ROWS == 1:  # the loop's bound already; a predicate kept across the division's
            # slow-path calls is one Triton 3.6's ptxas spills
            row_ok = tl.full([ROWS], True, tl.int1)
        else:
            row_ok = t + lanes < num_rows
        mag = mag_ptr + first + lanes
        old_mag = tl.load(mag, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        if MULTI:  # long rows: the peak over column chunks, then a second pass
            peak = tl.zeros([ROWS], dtype=tl.float32)
            for c in range(0, length, COLS):
                offs = local + c
                mask = row_ok[:, None] & (c + cols < length)[None, :]
                m, g = _moment(codebook_ptr, c_ptr, g_ptr, offs, mask, old_mag, beta, keep,
                               1.0, tl.float32)
                peak = tl.maximum(peak, _peak(m))
            stored = _to_state(peak, DTYPE)
            tl.store(mag, stored, mask=row_ok)
            stored = stored.to(tl.float32)[:, None]
            for c in range(0, length, COLS):
                offs = local + c
                mask = row_ok[:, None] & (c + cols < length)[None, :]
                m, g = _moment(codebook_ptr, c_ptr, g_ptr, offs, mask, old_mag, beta, keep,
                               1.0, tl.float32)
                _quantise_and_emit(m, g, mask, offs, c_ptr, o_ptr, stored, beta, keep,
                                   codebook_ptr, lut_ptr, bounds_ptr, first_ptr, half, NESTEROV)
        else:  # whole rows in one tile: one pass over memory
            mask = row_ok[:, None] & (cols < length)[None, :]
            m, g = _moment(codebook_ptr, c_ptr, g_ptr, local, mask, old_mag, beta, keep, 1.0,
                           tl.float32)
            stored = _to_state(_peak(m), DTYPE)
            tl.store(mag, stored, mask=row_ok)
            stored = stored.to(tl.float32)[:, None]
            _quantise_and_emit(m, g, mask, local, c_ptr, o_ptr, stored, beta, keep,
                               codebook_ptr, lut_ptr, bounds_ptr, first_ptr, half, NESTEROV)


# Row counts gain nothing from Triton's divisibility specialisation: no recompiles for them.
@triton.jit(do_not_specialize=["full_rows", "rows_per_program"])
def _momentum_kernel(grad_ptr, code_ptr, mag_ptr, out_ptr, block, full_rows, rows_per_program,
                     tail, beta, keep, codebook_ptr, lut_ptr, bounds_ptr, first_ptr, half,
                     DTYPE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                     MULTI: tl.constexpr, NESTEROV: tl.constexpr, ALIGNED: tl.constexpr):
    if ALIGNED:
        # Hints on the values themselves, in this body (one on a helper's argument is lost):
        # 16-byte pointers, blocks of 16 elements.
        block = tl.multiple_of(block, _ALIGN)
        grad_ptr = tl.multiple_of(grad_ptr, _ALIGN)
        code_ptr = tl.multiple_of(code_ptr, _ALIGN)
        out_ptr = tl.multiple_of(out_ptr, _ALIGN)
    row0 = tl.program_id(0).to(tl.int64) * rows_per_program
    if row0 < full_rows:
        num_rows = tl.minimum(full_rows - row0, rows_per_program).to(tl.int32)
        _momentum_rows(grad_ptr, code_ptr, mag_ptr, out_ptr, row0, num_rows, block, beta, keep,
                       codebook_ptr, lut_ptr, bounds_ptr, first_ptr, half, DTYPE, ROWS, COLS,
                       MULTI, NESTEROV)
    else:  # the program past the full rows: the short last row, in a tile of one row
        skip = full_rows.to(tl.int64) * block
        _momentum_rows(grad_ptr + skip, code_ptr + skip, mag_ptr + full_rows, out_ptr + skip,
                       0, 1, tail, beta, keep,
                       codebook_ptr, lut_ptr, bounds_ptr, first_ptr, half, DTYPE, 1, COLS,
                       MULTI, NESTEROV)


def supports(grad: torch.Tensor, block: int) -> bool:
    """Whether this kernel takes ``grad``'s step (else the torch path does: fp64, huge blocks)."""
    return grad.dtype in (torch.float32, torch.bfloat16, torch.float16) and 1 <= block < MAX_BLOCK


def momentum_step(grad: torch.Tensor, codes: torch.Tensor, magnitude: torch.Tensor, *,
                  block: int, tables, momentum: float, nesterov: bool) -> torch.Tensor:
    """kernels/momentum.py ``momentum_step`` for one parameter (:func:`supports` it), with
    ``tables`` its fp32 ``LookupTables`` on ``grad``'s device; the caller has checked the
    contract (contiguous, dtypes, element counts)."""
    update = torch.empty(grad.shape, dtype=torch.bfloat16, device=grad.device)
    n = grad.numel()
    if n == 0:
        return update
    full_rows, tail = divmod(n, block)
    cols, multi = row_class(block)  # a short last row fits the same tile
    aligned = (block % ALIGN == 0
               and (grad.data_ptr() | codes.data_ptr() | update.data_ptr()) % ALIGN == 0)
    rows = _tile_rows(cols, aligned)
    rows_per_program = rows * _tiles_per_program(full_rows, rows, block, grad.device)
    grid = (-(-full_rows // rows_per_program) + (tail > 0),)
    with torch.cuda.device(grad.device) if grad.device.type == "cuda" else nullcontext():
        _launch(
            _momentum_kernel, grid,
            # keep = 1 - momentum in float64, then fp32, as torch and the C rows round it.
            (grad, codes, magnitude, update, block, full_rows, rows_per_program, tail,
             momentum, 1.0 - momentum, tables.codebook, tables.lut, tables.bounds,
             tables.first_index, tables.half),
            dict(DTYPE=_TRITON_DTYPES[grad.dtype], ROWS=rows, COLS=cols, MULTI=multi,
                 NESTEROV=bool(nesterov), ALIGNED=aligned,
                 num_warps=4 if aligned or cols >= MAX_COLS else 8, enable_fp_fusion=False),
        )
    return update


def _tile_rows(cols: int, aligned: bool) -> int:
    """Rows of a tile: TILE elements (half without alignment, where every element takes its
    own address and predicate), or one row of MAX_COLS columns (whole or a chunk of a longer
    one: two rows at once take Triton 3.6's ptxas to 168 registers)."""
    return max(1, (TILE if aligned else TILE // 2) // cols) if cols < MAX_COLS else 1


def _tiles_per_program(full_rows: int, rows: int, block: int, device: torch.device) -> int:
    """Tiles each program walks: about ITEM_ELEMENTS elements, fewer where that would leave
    the GPU's SMs without a few programs each."""
    tiles = -(-full_rows // rows)
    most = max(1, ITEM_ELEMENTS // (rows * block))
    return max(1, min(most, tiles // (_PROGRAMS_PER_SM * _multiprocessors(device))))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter (or an ahead-of-time compile): any split is correct


def _launch(kernel, grid: tuple[int, ...], args: tuple, meta: dict) -> None:
    """One kernel launch (kernels/aot.py compiles through here without launching)."""
    kernel[grid](*args, **meta)
