"""Multi-tensor Gefen step in Triton (CUDA; ``TRITON_INTERPRET=1`` runs it on CPU tensors, which
is how CI tests it, and tests/test_triton_aot.py compiles it for sm_80 and sm_90 without a GPU).

Organised for memory bandwidth, as torch's fused AdamW is:

- Work comes from a table built once per bucket (``work_plan``): each program owns one *item*,
  a contiguous run of whole rows (magnitude blocks) of one parameter, thousands of elements,
  and reads its few fields with independent loads: no search, no chain of metadata loads.
- Items are grouped into classes by row length, and each class is one launch of a kernel
  specialised for it: a [ROWS, COLS] tile with COLS the row length rounded up to a power of two
  (rows longer than ``MAX_COLS`` loop over column chunks), so lanes are not masked away, and one
  program covers many short rows at once. A bucket takes one launch per class present: a small
  number bounded by the classes, independent of the number of parameters.
- Codes and state buffers are laid out 16-byte aligned per parameter (state.py); when every
  pointer of a class is aligned too and its rows are a multiple of 16 elements long, the kernel
  is told so (``ALIGNED``) and the compiler emits 128-bit loads and stores.
- The codebook lookup tables are small and read by every program: loaded with
  ``evict_last`` so they stay in cache, while the streamed data is loaded ``evict_first``.

The arithmetic follows kernels/torch_step.py: IEEE division and square root, no fused
multiply-adds, round to nearest even into the state dtype (NaN stays NaN), so the codes match
the other paths exactly.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import reduce
from operator import or_

import torch
import triton
import triton.language as tl

from . import StepInputs
from ..device_tables import slot_table
from . import work_plan
from .work_plan import classes

_TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}
# Warps of a program: with 4, each thread holds 16 elements of a tile, so 16 codes make one
# 128-bit access; without alignment accesses are scalar anyway, and 8 warps halve the registers
# that so many scalar addresses take.
_NUM_WARPS = {True: 4, False: 8}
# The work plan's constants, as the kernels may read globals: constexprs.
_ALIGN = tl.constexpr(work_plan.ALIGN)
_WORK_FIELDS = tl.constexpr(work_plan.WORK_FIELDS)
W_PARAM, W_ROW0, W_ROWS, W_LEN, W_CODE, W_V, W_ELEM = (
    tl.constexpr(work_plan.W_PARAM), tl.constexpr(work_plan.W_ROW0),
    tl.constexpr(work_plan.W_ROWS), tl.constexpr(work_plan.W_LEN),
    tl.constexpr(work_plan.W_CODE), tl.constexpr(work_plan.W_V), tl.constexpr(work_plan.W_ELEM),
)


@triton.jit
def _table(ptr, index):
    """A read of a small table every program reads: kept in cache."""
    return tl.load(ptr + index, eviction_policy="evict_last")


@triton.jit
def _nearest(x, lut_ptr, bounds_ptr, first_ptr, half):
    """Nearest-code lookup (see codebook.NearestCode): cell, boundary count, code."""
    scaled = tl.floor(x * half)  # exact: half is a power of two
    scaled = tl.where(scaled == scaled, scaled, -half)  # NaN -> first cell
    cell = tl.minimum(tl.maximum(scaled, -half), half - 1).to(tl.int32) + half
    below = _table(lut_ptr, cell)
    below += (x > _table(bounds_ptr, below)).to(tl.int32)
    return _table(first_ptr, below)


@triton.jit
def _div(a, b, COMPUTE: tl.constexpr):
    """IEEE round-to-nearest division (Triton's fp32 ``/`` may be approximate)."""
    if COMPUTE == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(a, COMPUTE: tl.constexpr):
    """IEEE round-to-nearest square root."""
    if COMPUTE == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def _to_state(x, DTYPE: tl.constexpr):
    """Round to the state dtype, to nearest even. bf16 by hand, because Triton's interpreter
    truncates where the GPU rounds; NaN becomes torch's bf16 NaN (the carry of the rounding
    would otherwise turn it into -0.0)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(x == x, rounded, 0x7FC0)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _moment(codebook_ptr, code_ptr, grad_ptr, offs, mask, old_mag, beta1, keep1, sign,
            COMPUTE: tl.constexpr):
    """The previous first moment, dequantised, moved by this step's gradient; and the gradient."""
    g = sign * tl.load(grad_ptr + offs, mask=mask, other=0.0,
                       eviction_policy="evict_first").to(COMPUTE)
    code = tl.load(code_ptr + offs, mask=mask, other=0, eviction_policy="evict_first")
    m = _table(codebook_ptr, code.to(tl.int32)) * old_mag
    # Lanes past a row's end hold 0, not a moment: they must not raise the row's peak.
    return tl.where(mask, m * beta1 + g * keep1, 0.0), g


@triton.jit
def _quantise_and_update(m, mask, offs, code_ptr, param_ptr, stored, scale, decay, codebook_ptr,
                         lut_ptr, bounds_ptr, first_ptr, half,
                         DTYPE: tl.constexpr, COMPUTE: tl.constexpr):
    """New codes of ``m`` against its row magnitude ``stored`` (0 where it is 0), and the
    parameter update with the quantised moment."""
    code = _nearest(_div(m, stored, COMPUTE), lut_ptr, bounds_ptr, first_ptr, half)
    code = tl.where(stored > 0, code, 0)
    tl.store(code_ptr + offs, code.to(tl.uint8), mask=mask)
    m_q = _table(codebook_ptr, code) * stored
    x = tl.load(param_ptr + offs, mask=mask, other=0.0).to(COMPUTE) * decay
    tl.store(param_ptr + offs, _to_state(x - m_q * scale, DTYPE), mask=mask)


@triton.jit
def _scale(v, mask, mean, beta2, keep2, eps, step_size, bias2, DTYPE: tl.constexpr,
           COMPUTE: tl.constexpr):
    """Stores the second moment at ``v`` moved by ``mean`` (a row's mean square gradient, or an
    element's square) and returns the update's scale, step_size / (sqrt(v / bias2) + eps)."""
    v_new = _to_state(tl.load(v, mask=mask, other=0.0).to(COMPUTE) * beta2 + mean * keep2,
                      DTYPE)
    tl.store(v, v_new, mask=mask)
    denom = _sqrt(_div(v_new.to(COMPUTE), bias2, COMPUTE), COMPUTE) + eps
    return _div(step_size, denom, COMPUTE)


@triton.jit
def _gefen_step_kernel(
    work_ptr, pointers_ptr, has_grad_ptr, param_group_ptr, hyper_ptr, scalars_ptr,
    codes_ptr, mag_ptr, v_ptr, codebook_ptr, lut_ptr, bounds_ptr, first_ptr, half,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    PER_ELEMENT: tl.constexpr, MULTI: tl.constexpr, ALIGNED: tl.constexpr,
):
    w = work_ptr + tl.program_id(0).to(tl.int64) * _WORK_FIELDS
    p = tl.load(w + W_PARAM)
    if tl.load(has_grad_ptr + p) != 0:
        row0 = tl.load(w + W_ROW0)
        num_rows = tl.load(w + W_ROWS).to(tl.int32)
        length = tl.load(w + W_LEN).to(tl.int32)
        elem0 = tl.load(w + W_ELEM)
        code_ptr = codes_ptr + tl.load(w + W_CODE)
        param_ptr = tl.load(pointers_ptr + 2 * p).to(tl.pointer_type(DTYPE)) + elem0
        grad_ptr = tl.load(pointers_ptr + 2 * p + 1).to(tl.pointer_type(DTYPE)) + elem0
        v_row_ptr = v_ptr + tl.load(w + W_V)  # the second moment of the item's first row/element
        if ALIGNED:
            # Declared on the values themselves, in this body: a hint on a helper's argument
            # is lost. Pointers: 16 bytes; row lengths: 16 elements.
            length = tl.multiple_of(length, _ALIGN)
            code_ptr = tl.multiple_of(code_ptr, _ALIGN)
            param_ptr = tl.multiple_of(param_ptr, _ALIGN)
            grad_ptr = tl.multiple_of(grad_ptr, _ALIGN)
            v_row_ptr = tl.multiple_of(v_row_ptr, _ALIGN)

        h = hyper_ptr + tl.load(param_group_ptr + p) * 6
        lr, b1, b2 = tl.load(h), tl.load(h + 1), tl.load(h + 2)
        beta1, keep1 = b1.to(COMPUTE), (1.0 - b1).to(COMPUTE)
        beta2, keep2 = b2.to(COMPUTE), (1.0 - b2).to(COMPUTE)
        eps = tl.load(h + 3).to(COMPUTE)
        decay = (1.0 - lr * tl.load(h + 4)).to(COMPUTE)
        sign = tl.where(tl.load(h + 5) != 0.0, -1.0, 1.0).to(COMPUTE)
        step_size = tl.load(scalars_ptr + 2 * p).to(COMPUTE)
        bias2 = tl.load(scalars_ptr + 2 * p + 1).to(COMPUTE)

        cols = tl.arange(0, COLS)
        for r in range(0, num_rows, ROWS):
            rows = r + tl.arange(0, ROWS)
            row_ok = rows < num_rows
            mag = mag_ptr + row0 + rows
            old_mag = tl.load(mag, mask=row_ok, other=0.0).to(COMPUTE)[:, None]
            if MULTI:  # long rows: reductions over column chunks, then the update
                peak = tl.zeros([ROWS], dtype=COMPUTE)
                square_sum = tl.zeros([ROWS], dtype=COMPUTE)
                for c in range(0, length, COLS):
                    offs = (rows * length + c)[:, None] + cols[None, :]
                    mask = row_ok[:, None] & (c + cols < length)[None, :]
                    m, g = _moment(codebook_ptr, code_ptr, grad_ptr, offs, mask, old_mag, beta1,
                                   keep1, sign, COMPUTE)
                    peak = tl.maximum(peak, tl.max(tl.abs(m), axis=1))
                    square_sum += tl.sum(g * g, axis=1)
                stored = _to_state(peak, DTYPE)
                tl.store(mag, stored, mask=row_ok)
                stored = stored.to(COMPUTE)[:, None]
                mean = _div(square_sum, length.to(COMPUTE), COMPUTE)
                scale = _scale(v_row_ptr + rows, row_ok, mean, beta2, keep2, eps, step_size,
                               bias2, DTYPE, COMPUTE)[:, None]
                for c in range(0, length, COLS):
                    offs = (rows * length + c)[:, None] + cols[None, :]
                    mask = row_ok[:, None] & (c + cols < length)[None, :]
                    m, g = _moment(codebook_ptr, code_ptr, grad_ptr, offs, mask, old_mag, beta1,
                                   keep1, sign, COMPUTE)
                    _quantise_and_update(m, mask, offs, code_ptr, param_ptr, stored, scale, decay,
                                         codebook_ptr, lut_ptr, bounds_ptr, first_ptr, half,
                                         DTYPE, COMPUTE)
            else:  # whole rows in one tile: one pass over memory
                offs = (rows * length)[:, None] + cols[None, :]
                mask = row_ok[:, None] & (cols < length)[None, :]
                m, g = _moment(codebook_ptr, code_ptr, grad_ptr, offs, mask, old_mag, beta1,
                               keep1, sign, COMPUTE)
                stored = _to_state(tl.max(tl.abs(m), axis=1), DTYPE)
                tl.store(mag, stored, mask=row_ok)
                stored = stored.to(COMPUTE)[:, None]
                if PER_ELEMENT:
                    scale = _scale(v_row_ptr + offs, mask, g * g, beta2, keep2, eps, step_size,
                                   bias2, DTYPE, COMPUTE)
                else:
                    mean = _div(tl.sum(g * g, axis=1), length.to(COMPUTE), COMPUTE)
                    scale = _scale(v_row_ptr + rows, row_ok, mean, beta2, keep2, eps,
                                   step_size, bias2, DTYPE, COMPUTE)[:, None]
                _quantise_and_update(m, mask, offs, code_ptr, param_ptr, stored, scale, decay,
                                     codebook_ptr, lut_ptr, bounds_ptr, first_ptr, half,
                                     DTYPE, COMPUTE)


def step(*args) -> None:
    """One Gefen step of every row of a bucket: one launch per work class (the arguments of
    ops.step_)."""
    a = StepInputs(*args)
    # List comprehensions, not generators: this is the host work that grows with the number
    # of tensors (DESIGN: host time per tensor small beside the kernel).
    addresses = [0] * (2 * len(a.params))
    addresses[0::2] = [p.data_ptr() for p in a.params]
    addresses[1::2] = [0 if g is None else g.data_ptr() for g in a.grads]
    _step(a, addresses, [g is not None for g in a.grads])


def step_from_tables(a: StepInputs, params: torch.Tensor, grads: torch.Tensor,
                     has_grad: torch.Tensor) -> None:
    """:func:`step` with the parameters' and gradients' data pointers (int64) and which have a
    gradient (uint8) in host tables (kernels/prepared.py fills them); ``a``'s lists of params
    and grads are not read."""
    _step(a, torch.stack([params, grads], dim=1).view(-1).tolist(), has_grad.tolist())


def _step(a: StepInputs, addresses: list[int], has_grad: list) -> None:
    """The launches of :func:`step`, given each parameter's and then its gradient's data
    pointer (0: none) and which have a gradient."""
    device = a.codes.device
    bucket = (device, a.codes.data_ptr())  # the same slot every step of this bucket
    has_grad = slot_table((*bucket, "has_grad"), has_grad, torch.uint8, device)
    if a.skip is not None:  # every parameter sits the step out, decided on the device
        has_grad = has_grad * (a.skip == 0)
    pointers = slot_table((*bucket, "pointers"), addresses, torch.int64, device)
    # Step counts and bias corrections on the device: no host sync, CUDA-graph capturable.
    a.steps.add_(has_grad)
    # Per parameter, float64: lr / (1 - beta1^step) and 1 - beta2^step (IEEE division here,
    # so the kernel needs no float64 division).
    hyper = a.hyper.index_select(0, a.param_group)
    bias = 1 - hyper[:, 1:3] ** a.steps.double().unsqueeze(1)
    scalars = torch.stack([hyper[:, 0] / bias[:, 0], bias[:, 1]], dim=1)
    # Parameters and gradients are the user's tensors: 128-bit access only where all are
    # aligned (they are, straight from the caching allocator; views may not be).
    pointers_aligned = reduce(or_, addresses, 0) % work_plan.ALIGN == 0
    compute = tl.float64 if a.vmean.dtype == torch.float64 else tl.float32
    # CPU buckets (the interpreter runs this launcher on CPU tensors in tests) come without
    # the work plan, which the CPU kernels never read.
    plan = ((a.work, a.work_classes) if device.type == "cuda"
            else work_plan.work_plan(a.segments, [p.numel() for p in a.params]))
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        for work, c in zip(plan[0], classes(plan[1])):
            aligned = c.aligned and pointers_aligned
            _launch(
                _gefen_step_kernel, (work.shape[0],),
                (work, pointers, has_grad, a.param_group, a.hyper, scalars, a.codes, a.magnitude,
                 a.vmean, a.codebook, a.lut, a.bounds, a.first_index, a.lut_half),
                dict(DTYPE=_TRITON_DTYPES[a.vmean.dtype], COMPUTE=compute, ROWS=c.rows,
                     COLS=c.cols, PER_ELEMENT=c.per_element, MULTI=c.multi,
                     ALIGNED=aligned, num_warps=_NUM_WARPS[aligned or c.cols >= 1024],
                     enable_fp_fusion=False),
            )


def _launch(kernel, grid: tuple[int, ...], args: tuple, meta: dict) -> None:
    """One kernel launch (tests/test_triton_aot.py compiles through here without launching)."""
    kernel[grid](*args, **meta)
