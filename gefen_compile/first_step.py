"""What Gefen reads off first gradients: periods and the codebook, for many parameters at once
with one host round trip for all their scores (GEFEN_SPEC "Period inference", "Codebook")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import ops
from .codebook import learn_codebook
from .distributed import global_histogram
from .partition import candidate_periods, scored_candidates, select_period


def infer_periods(grads: Sequence[torch.Tensor]) -> list[int]:
    """The period of every tensor, from its first gradient."""
    if not grads:
        return []
    candidates = [candidate_periods(g.numel()) for g in grads]
    scored = [scored_candidates(c) for c in candidates]
    flat, offsets = ops.flat_candidates(scored)
    scores = ops.period_scores(list(grads), flat, offsets).tolist() if flat else []
    return [
        select_period(c, dict(zip(s, scores[a:b])))
        for c, s, a, b in zip(candidates, scored, offsets, offsets[1:])
    ]


def infer_period(grad: torch.Tensor) -> int:
    """Gefen's period for one tensor, from its first gradient."""
    return infer_periods([grad])[0]


def codebook_from(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    periods: Sequence[int],
    negate: Sequence[bool],
) -> torch.Tensor | None:
    """The codebook learned from the first gradients of ``params`` (local tensors; negated where
    ``negate``: maximize), or None when they hold no element. Summed over the ranks that hold
    shards of DTensor parameters (distributed.global_histogram)."""
    counts = global_histogram(params, grads, periods, negate)
    if counts is None:
        return None
    counts = counts.cpu()
    return learn_codebook(counts) if counts.any() else None
