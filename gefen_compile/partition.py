"""How Gefen cuts a tensor into blocks: period inference and magnitude block sizes.

GEFEN_SPEC "Period inference": a tensor's period P is read off its first gradient; every block
of P consecutive (flattened) elements then shares one second-moment value and one first-moment
magnitude.
"""

from __future__ import annotations

import math

import torch

# log(g^2 + LOG_FLOOR): keeps exact zeros finite, as published.
LOG_FLOOR = 1e-12
# A peak needs p > MIN_PEAK_PERIOD.
MIN_PEAK_PERIOD = 8
# Periods larger than this are cut down to a divisor just above it.
MAX_PERIOD = 1024
# Largest magnitude block of a period-1 tensor.
MAX_MAGNITUDE_BLOCK = 256


def divisors(n: int) -> list[int]:
    """All divisors of ``n`` in increasing order."""
    small, large = [], []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
    return small + large[::-1]


def candidate_periods(n: int) -> list[int]:
    """Divisors ``p`` of ``n`` with ``p < n`` and at least four blocks, increasing."""
    return [p for p in divisors(n) if p < n and n // p >= 4]


def scored_candidates(candidates: list[int]) -> list[int]:
    """The candidates whose scores the choice of period can depend on: every possible peak
    (p > 8) and, as the left neighbour of the smallest, the largest p <= 8. The small periods
    are the costly ones (n/p block means each), so the others are not scored at all."""
    if len(candidates) < 3:
        return []
    small = [p for p in candidates if p <= MIN_PEAK_PERIOD]
    return small[-1:] + [p for p in candidates if p > MIN_PEAK_PERIOD]


def period_scores(grad: torch.Tensor, candidates: list[int]) -> torch.Tensor:
    """float64 scores (on ``grad``'s device) of the candidate periods of ``grad``: the mean
    |difference| of adjacent block means of log(g^2 + 1e-12).

    Every block mean of every candidate comes from one prefix sum, so all scores together cost
    O(n) rather than a pass over the data per candidate. Plain torch ops, no host round trip:
    the CUDA path (the CPU path is the C kernel in kernels/cpu_step.c).
    """
    n = grad.numel()
    x = grad.detach().reshape(-1).to(torch.float64)
    x = torch.log(x * x + LOG_FLOOR)
    # Shifting by x[0] keeps the prefix sum exact over constant runs (all-zero gradients, say),
    # so blocks that are equal in exact arithmetic stay equal and score exactly zero.
    x -= x[0].clone()
    prefix = torch.zeros(n + 1, dtype=torch.float64, device=x.device)
    torch.cumsum(x, 0, out=prefix[1:])
    # Adjacent block means differ by the second difference of the prefix at block edges.
    scores = [torch.diff(prefix[::p], n=2).abs().mean() / p for p in candidates]
    return torch.stack(scores) if scores else prefix.new_zeros(0)


def select_period(candidates: list[int], scores: dict[int, float]) -> int:
    """The period GEFEN_SPEC picks, from a tensor's candidate periods and the scores of (at
    least) its ``scored_candidates``."""
    if len(candidates) < 3:
        return 1
    best, best_score = 1, -math.inf
    for left, p, right in zip(candidates, candidates[1:], candidates[2:]):
        if p <= MIN_PEAK_PERIOD:
            continue
        s = scores[p]
        is_peak = s > scores[left] and s > scores[right]
        # Ties between peaks go to the larger p, which comes later in the increasing list.
        if is_peak and s >= best_score:
            best, best_score = p, s
    if best > MAX_PERIOD:
        best = next(d for d in divisors(best) if d > MAX_PERIOD)
    return best


def published_magnitude_block(n: int) -> int:
    """Q of GEFEN_SPEC: elements per first-moment magnitude of a period-1 tensor, as
    published: the largest divisor of ``n`` that is at most 256 (variant.py holds both
    variants' rules)."""
    return max((d for d in divisors(n) if d <= MAX_MAGNITUDE_BLOCK), default=1)
