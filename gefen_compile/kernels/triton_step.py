"""One-launch multi-tensor Gefen step in Triton (CUDA; ``TRITON_INTERPRET=1`` runs it on CPU
tensors, which is how CI tests it).

One program per row (magnitude block) of a bucket, whatever parameter, period or group it
belongs to: parameters and gradients are reached through tables of data pointers, group
hyperparameters through a small float64 table, so learning-rate changes change data, never the
compiled kernel. The arithmetic follows kernels/torch_step.py: IEEE division and square root,
no fused multiply-adds, so the codes match the core implementation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..device_tables import device_table
from . import StepInputs
from ..state import SEG_FIELDS

_TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}
_MAX_BLOCK = 1024


@triton.jit
def _nearest(x, lut_ptr, bounds_ptr, first_ptr, half):
    """Nearest-code lookup (see codebook.NearestCode): cell, boundary count, code."""
    scaled = tl.floor(x * half)  # exact: half is a power of two
    scaled = tl.where(scaled == scaled, scaled, -half)  # NaN -> first cell
    cell = tl.minimum(tl.maximum(scaled, -half), half - 1).to(tl.int32) + half
    below = tl.load(lut_ptr + cell).to(tl.int32)
    below += (x > tl.load(bounds_ptr + below)).to(tl.int32)
    return tl.load(first_ptr + below).to(tl.int32)


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
    """Round to the state dtype to nearest even; bf16 by hand, because Triton's interpreter
    truncates where the GPU rounds."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _first_moment(codebook_ptr, code_ptr, grad, offs, mask, old_mag, beta1, keep1, sign):
    """The previous first moment, dequantised, moved by this step's gradient."""
    g = sign * tl.load(grad + offs, mask=mask, other=0.0).to(old_mag.dtype)
    m = tl.load(codebook_ptr + tl.load(code_ptr + offs, mask=mask, other=0)) * old_mag
    return m * beta1 + g * keep1, g


@triton.jit
def _param_of_row(segments_ptr, num_params, r, FIELDS: tl.constexpr):
    """The last parameter whose first row is at most r (see cpu_step.c: param_of_row)."""
    lo = tl.full([], 0, tl.int64)
    hi = num_params - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        below = tl.load(segments_ptr + mid * FIELDS) <= r
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid - 1)
    return lo


@triton.jit
def _gefen_step_kernel(
    segments_ptr, num_params, pointers_ptr, has_grad_ptr, param_group_ptr, hyper_ptr, bias_ptr,
    codes_ptr, mag_ptr, v_ptr, codebook_ptr, lut_ptr, bounds_ptr, first_ptr, half,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, FIELDS: tl.constexpr, BLOCK: tl.constexpr,
):
    mag_index = tl.program_id(0).to(tl.int64)  # one row per magnitude
    p = _param_of_row(segments_ptr, num_params, mag_index, FIELDS)
    if tl.load(has_grad_ptr + p) != 0:
        seg = segments_ptr + p * FIELDS
        length = tl.load(seg + 1)
        row = mag_index - tl.load(seg)
        start = row * length
        code_ptr = codes_ptr + tl.load(seg + 2) + start
        per_element = tl.load(seg + 4) != 0
        v_index = tl.load(seg + 3) + tl.where(per_element, start, row)
        h = hyper_ptr + tl.load(param_group_ptr + p) * 6
        lr, b1, b2 = tl.load(h), tl.load(h + 1), tl.load(h + 2)
        beta1, keep1 = b1.to(COMPUTE), (1.0 - b1).to(COMPUTE)
        beta2, keep2 = b2.to(COMPUTE), (1.0 - b2).to(COMPUTE)
        eps = tl.load(h + 3).to(COMPUTE)
        decay = (1.0 - lr * tl.load(h + 4)).to(COMPUTE)
        sign = tl.where(tl.load(h + 5) != 0.0, -1.0, 1.0).to(COMPUTE)
        step_size = (lr / tl.load(bias_ptr + 2 * p)).to(COMPUTE)
        bias2 = tl.load(bias_ptr + 2 * p + 1).to(COMPUTE)
        param = tl.load(pointers_ptr + 2 * p).to(tl.pointer_type(DTYPE)) + start
        grad = tl.load(pointers_ptr + 2 * p + 1).to(tl.pointer_type(DTYPE)) + start
        old_mag = tl.load(mag_ptr + mag_index).to(COMPUTE)

        peak = tl.full([], 0.0, COMPUTE)
        square_sum = tl.full([], 0.0, COMPUTE)
        for lo in range(0, length, BLOCK):
            offs = lo + tl.arange(0, BLOCK)
            mask = offs < length
            m, g = _first_moment(codebook_ptr, code_ptr, grad, offs, mask, old_mag, beta1, keep1, sign)
            peak = tl.maximum(peak, tl.max(tl.where(mask, tl.abs(m), 0.0), axis=0))
            square = g * g
            if per_element:
                v = v_ptr + v_index + offs
                tl.store(v, _to_state(tl.load(v, mask=mask).to(COMPUTE) * beta2 + square * keep2, DTYPE), mask=mask)
            else:
                square_sum += tl.sum(square, axis=0)
        stored = _to_state(peak, DTYPE)
        tl.store(mag_ptr + mag_index, stored)
        stored = stored.to(COMPUTE)
        shared_scale = tl.full([], 0.0, COMPUTE)
        if not per_element:
            mean = _div(square_sum, length.to(COMPUTE), COMPUTE)
            v = _to_state(tl.load(v_ptr + v_index).to(COMPUTE) * beta2 + mean * keep2, DTYPE)
            tl.store(v_ptr + v_index, v)
            denom = _sqrt(_div(v.to(COMPUTE), bias2, COMPUTE), COMPUTE) + eps
            shared_scale = _div(step_size, denom, COMPUTE)

        for lo in range(0, length, BLOCK):
            offs = lo + tl.arange(0, BLOCK)
            mask = offs < length
            m, g = _first_moment(codebook_ptr, code_ptr, grad, offs, mask, old_mag, beta1, keep1, sign)
            code = _nearest(_div(m, stored, COMPUTE), lut_ptr, bounds_ptr, first_ptr, half)
            code = tl.where(stored > 0, code, 0)
            tl.store(code_ptr + offs, code.to(tl.uint8), mask=mask)
            m_q = tl.load(codebook_ptr + code) * stored
            if per_element:
                v = tl.load(v_ptr + v_index + offs, mask=mask, other=1.0).to(COMPUTE)
                scale = _div(step_size, _sqrt(_div(v, bias2, COMPUTE), COMPUTE) + eps, COMPUTE)
            else:
                scale = shared_scale
            x = tl.load(param + offs, mask=mask).to(COMPUTE) * decay
            x = x - m_q * scale
            tl.store(param + offs, _to_state(x, DTYPE), mask=mask)


def step(*args) -> None:
    """One Gefen step of every row of a bucket in one kernel launch (the arguments of
    ops.step_)."""
    a = StepInputs(*args)
    device = a.codes.device
    has_grad = device_table(tuple(g is not None for g in a.grads), torch.uint8, device)
    pointers = device_table(
        tuple(x for p, g in zip(a.params, a.grads) for x in (p.data_ptr(), _address(g))),
        torch.int64,
        device,
    )
    # Step counts and bias corrections on the device: no host sync, CUDA-graph capturable.
    a.steps.add_(has_grad)
    betas = a.hyper[a.param_group][:, 1:3]
    bias = (1 - betas ** a.steps.double().unsqueeze(1)).contiguous()
    if a.num_rows == 0:
        return
    _gefen_step_kernel[(a.num_rows,)](
        a.segments, len(a.params), pointers, has_grad, a.param_group, a.hyper, bias,
        a.codes, a.magnitude, a.vmean, a.codebook, a.lut, a.bounds, a.first_index, a.lut_half,
        DTYPE=_TRITON_DTYPES[a.vmean.dtype],
        COMPUTE=tl.float64 if a.vmean.dtype == torch.float64 else tl.float32,
        FIELDS=SEG_FIELDS,
        BLOCK=min(_MAX_BLOCK, triton.next_power_of_2(a.max_row_len)),
        enable_fp_fusion=False,
    )


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
