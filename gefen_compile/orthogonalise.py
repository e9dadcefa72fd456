"""Muon's orthogonalisation and learning-rate adjustment, as ``torch.optim.Muon`` computes them
(torch 2.9 and later), for GefenMuon (muon.py): the same operations in the same order and
dtypes, so that both optimizers turn one update into the same step."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Keller Jordan's quintic coefficients and epsilon, torch.optim.Muon's defaults.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def newton_schulz(update: Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> Tensor:
    """The approximately orthogonal matrix (bfloat16) of a 2-D ``update``: ``steps`` quintic
    Newton-Schulz iterations on the bfloat16 matrix scaled to Frobenius norm <= 1, worked on
    its wide orientation."""
    a, b, c = coefficients
    x = update.bfloat16()
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, polynomial, x, beta=a)
    return x.T if tall else x


def lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The factor Muon multiplies lr by for a matrix of ``shape``: sqrt(max(1, rows / cols))
    (``None``, ``"original"``), or 0.2 sqrt(max(rows, cols)) (``"match_rms_adamw"``, which lets
    AdamW's lr and weight decay carry over)."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))
