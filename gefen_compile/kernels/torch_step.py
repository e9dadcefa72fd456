"""One Gefen step for one parameter in plain torch ops, on any device (GEFEN_SPEC "One step").

Every floating-point operation that feeds a quantisation decision is written out one op at a
time (no fused multiply-adds such as ``addcmul``/``lerp``), so the codes are reproducible by any
implementation that follows the spec's fp32 arithmetic.
"""

from __future__ import annotations

import torch

from ..codebook import NearestCode
from ..partition import magnitude_block
from ..state import compute_dtype


def gefen_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    codebook: torch.Tensor,
    nearest: NearestCode,
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Update ``param`` and its ``state`` in place from ``grad``.

    ``codebook`` holds the codebook's entries in the compute dtype on ``param``'s device.
    """
    codes, magnitude, vmean = state["codes"], state["magnitude"], state["vmean"]
    period = state["period"]
    dtype = compute_dtype(vmean.dtype)
    g = grad.reshape(-1).to(dtype)
    if maximize:
        g = -g

    square = g * g
    if period > 1:
        square = square.view(-1, period).mean(dim=1)
    vmean.copy_(vmean.to(dtype) * beta2 + square * (1 - beta2))

    step = state["step"]
    step += 1

    block = magnitude_block(codes.numel(), period)
    m = codebook[codes.long()].view(-1, block) * magnitude.to(dtype).unsqueeze(1)
    m = m * beta1 + g.view(-1, block) * (1 - beta1)
    new_codes = quantise_blocks(m, magnitude, nearest)
    codes.copy_(new_codes.view(-1))
    m_q = codebook[new_codes] * magnitude.to(dtype).unsqueeze(1)

    step64 = step.double()
    bias1 = 1 - beta1**step64
    bias2 = 1 - beta2**step64
    # One division per second moment (per block, or per element for period 1).
    scale = (lr / bias1) / ((vmean.to(dtype) / bias2).sqrt() + eps)
    if period > 1:
        m_q, scale = m_q.view(-1, period), scale.unsqueeze(1)
    else:
        m_q = m_q.view(-1)
    # The decay factor in float64, as the kernels compute it, also for a (float32) tensor lr.
    decay = 1 - (lr.double() if isinstance(lr, torch.Tensor) else lr) * weight_decay
    p = param.reshape(-1).to(dtype) * decay
    p = p.view(m_q.shape) - m_q * scale
    param.copy_(p.view_as(param))


def quantise_blocks(m: torch.Tensor, magnitude: torch.Tensor, nearest: NearestCode) -> torch.Tensor:
    """Codes (int64, ``m``'s shape) of the rows of ``m`` (one magnitude block each), writing each
    row's max |m| into ``magnitude``; values are divided by the magnitude as stored, in its dtype."""
    magnitude.copy_(m.abs().amax(dim=1))
    stored = magnitude.to(m.dtype).unsqueeze(1)
    # An all-zero block normalises to -inf, whose nearest code is 0, as the spec asks.
    return nearest(torch.where(stored > 0, m / stored, -torch.inf))
