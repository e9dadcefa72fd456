"""Gefen's step in plain torch ops, on any device (GEFEN_SPEC "One step"): the core
implementation, one parameter at a time (:func:`update_parameter`), seen through a parameter's
state (:func:`gefen_update`) or through a bucket's flat buffers (:func:`step`, the CPU path where
the C kernels are not built).

Every floating-point operation that feeds a quantisation decision is written out one op at a
time (no fused multiply-adds such as ``addcmul``/``lerp``), so the codes are reproducible by any
implementation that follows the spec's fp32 arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..codebook import LookupTables
from ..state import compute_dtype
from ..variant import Variant
from . import StepInputs


def step(*args) -> None:
    """One Gefen step of every parameter of a bucket with a gradient, in place (the arguments of
    ops.step_), parameter by parameter through views of the bucket's buffers. Reads the segment
    and hyperparameter tables on the host."""
    a = StepInputs(*args)
    if a.skip is not None and a.skip.item():
        return
    nearest = LookupTables(a.codebook, a.lut, a.bounds, a.first_index, a.lut_half).codes
    hyper = a.hyper.tolist()
    segments = a.segments.tolist()
    for i, (param, grad, group) in enumerate(zip(a.params, a.grads, a.param_group.tolist())):
        if grad is None:
            continue
        row0, block, code0, v0, per_element, n = segments[i]
        rows = -(-n // block)
        lr, beta1, beta2, eps, weight_decay, maximize = hyper[group]
        update_parameter(
            param, grad, a.codes[code0 : code0 + n], a.magnitude[row0 : row0 + rows],
            a.vmean[v0 : v0 + (n if per_element else rows)], a.steps[i],
            period=1 if per_element else block, block=block, codebook=a.codebook,
            nearest=nearest, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, maximize=bool(maximize),
        )


def gefen_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    codebook: torch.Tensor,
    nearest: Callable[[torch.Tensor], torch.Tensor],
    variant: Variant,
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Update ``param`` and its ``state`` in place from ``grad``.

    ``codebook`` holds the codebook's entries in the compute dtype on ``param``'s device;
    ``nearest`` maps values to codes (a ``codebook.NearestCode``)."""
    period = state["period"]
    update_parameter(
        param, grad, state["codes"], state["magnitude"], state["vmean"], state["step"],
        period=period, block=variant.magnitude_block(state["codes"].numel(), period),
        codebook=codebook, nearest=nearest, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, maximize=maximize,
    )


def update_parameter(
    param: torch.Tensor,
    grad: torch.Tensor,
    codes: torch.Tensor,
    magnitude: torch.Tensor,
    vmean: torch.Tensor,
    count: torch.Tensor,
    *,
    period: int,
    block: int,
    codebook: torch.Tensor,
    nearest: Callable[[torch.Tensor], torch.Tensor],
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """The step of one parameter: updates ``param``, its state tensors (``codes`` .. ``vmean``,
    see state.py) and its step ``count`` (a float32 scalar tensor) in place; ``block`` is its
    magnitude block (``Variant.magnitude_block``; the last block may be shorter)."""
    dtype = compute_dtype(vmean.dtype)
    g = grad.reshape(-1).to(dtype)
    if maximize:
        g = -g

    square = g * g
    if period > 1:
        square = square.view(-1, period).mean(dim=1)
    vmean.copy_(vmean.to(dtype) * beta2 + square * (1 - beta2))

    count += 1

    m_q = quantised_moment(g, codes, magnitude, block=block, codebook=codebook, nearest=nearest,
                           beta=beta1)

    step64 = count.double()
    bias1 = 1 - beta1**step64
    bias2 = 1 - beta2**step64
    # One division per second moment (per block, or per element for period 1). torch.div, as
    # the kernels divide: ``float / tensor`` would multiply by a rounded reciprocal.
    scale = torch.div(lr, bias1) / ((vmean.to(dtype) / bias2).sqrt() + eps)
    if period > 1:
        m_q, scale = m_q.view(-1, period), scale.unsqueeze(1)
    # The decay factor in float64, as the kernels compute it, also for a (float32) tensor lr.
    decay = 1 - (lr.double() if isinstance(lr, torch.Tensor) else lr) * weight_decay
    p = param.reshape(-1).to(dtype) * decay
    p = p.view(m_q.shape) - m_q * scale
    param.copy_(p.view_as(param))


def quantised_moment(g: torch.Tensor, codes: torch.Tensor, magnitude: torch.Tensor, *,
                     block: int, codebook: torch.Tensor,
                     nearest: Callable[[torch.Tensor], torch.Tensor], beta: float) -> torch.Tensor:
    """The moving average ``beta * m + (1 - beta) * g`` of the quantised moment m (``codes``
    and ``magnitude``, updated in place to hold the new one) and flat ``g`` (the compute
    dtype); returns the new moment as stored, dequantised (flat, ``g``'s dtype)."""
    dtype, n = g.dtype, g.numel()
    m = as_blocks(codebook[codes.long()], block) * magnitude.to(dtype).unsqueeze(1)
    m = m * beta + as_blocks(g, block) * (1 - beta)
    new_codes = quantise_blocks(m, magnitude, nearest)
    codes.copy_(new_codes.view(-1)[:n])
    return (codebook[new_codes] * magnitude.to(dtype).unsqueeze(1)).view(-1)[:n]


def as_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """Flat ``x`` as rows of ``block`` elements; a short last row is filled with zeros, which
    raise no block's max |m| and whose codes are dropped."""
    return torch.nn.functional.pad(x, (0, -x.numel() % block)).view(-1, block)


def quantise_blocks(
    m: torch.Tensor, magnitude: torch.Tensor, nearest: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Codes (int64, ``m``'s shape) of the rows of ``m`` (one magnitude block each), writing each
    row's max |m| (of its elements not NaN) into ``magnitude``; values are divided by the magnitude as stored, in its dtype."""
    # NaN elements do not count, as in the C rows (max(|m|, peak) keeps the peak): one NaN
    # gradient then NaNs its element, not its whole block for good.
    magnitude.copy_(torch.where(m.isnan(), 0, m.abs()).amax(dim=1))
    stored = magnitude.to(m.dtype).unsqueeze(1)
    # An all-zero block normalises to -inf, whose nearest code is 0, as the spec asks.
    return nearest(torch.where(stored > 0, m / stored, -torch.inf))


def momentum_update(
    grad: torch.Tensor,
    codes: torch.Tensor,
    magnitude: torch.Tensor,
    *,
    block: int,
    codebook: torch.Tensor,
    nearest: Callable[[torch.Tensor], torch.Tensor],
    momentum: float,
    nesterov: bool,
) -> torch.Tensor:
    """GefenMuon's momentum step of one parameter (muon.py): ``codes`` and ``magnitude`` are
    updated in place, and the update Muon orthogonalises is returned, in bfloat16 (the dtype
    its Newton-Schulz iteration starts from), in ``grad``'s shape."""
    g = grad.reshape(-1).to(compute_dtype(magnitude.dtype))
    m_q = quantised_moment(g, codes, magnitude, block=block, codebook=codebook, nearest=nearest,
                           beta=momentum)
    update = m_q * momentum + g * (1 - momentum) if nesterov else m_q
    return update.to(torch.bfloat16).view(grad.shape)
