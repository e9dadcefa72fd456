"""What Gefen reads off first gradients: periods and the codebook's histogram, for many
parameters at once (GEFEN_SPEC "Period inference", "Codebook"). Two host round trips in all,
whatever the number or size of the tensors: the periods (with the finiteness check), then the histogram, which needs
the periods to cut rows, for the codebook's dynamic program on the host."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import ops
from .distributed import global_histogram
from .partition import candidate_periods, scored_candidates, select_period
from .variant import Variant


def infer_periods(grads: Sequence[torch.Tensor], variant: Variant) -> list[int]:
    """The period of every tensor, from its first gradient."""
    return read_first_gradients(grads, variant)[0]


def read_first_gradients(
    grads: Sequence[torch.Tensor], variant: Variant,
) -> tuple[list[int], list[bool], list[bool]]:
    """The period of every tensor (as ``variant`` sets it from the inferred one), whether its
    first gradient is finite and whether it has a non-zero element, with one host round trip
    for all of them (on CUDA: one sync, whatever the number of tensors)."""
    if not grads:
        return [], [], []
    candidates = [candidate_periods(g.numel()) for g in grads]
    scored = [scored_candidates(c) for c in candidates]
    flat, offsets = ops.flat_candidates(scored)
    host = ops.first_gradient_facts(list(grads), flat, offsets).tolist()
    count = len(grads)
    finite = [v != 0.0 for v in host[:count]]
    nonzero = [v != 0.0 for v in host[count : 2 * count]]
    scores = host[2 * count :]
    periods = [
        variant.period(tuple(g.shape), select_period(c, dict(zip(s, scores[a:b]))))
        for g, c, s, a, b in zip(grads, candidates, scored, offsets, offsets[1:])
    ]
    return periods, finite, nonzero


def infer_period(grad: torch.Tensor, variant: Variant) -> int:
    """Gefen's period for one tensor, from its first gradient."""
    return infer_periods([grad], variant)[0]


def shard_period(informed: int, shape: tuple[int, ...], variant: Variant) -> int:
    """The period of a DTensor parameter's local shard whose first gradient is all zero while
    other ranks' shards of it are not: the largest of the shard's candidate periods that
    divides ``informed`` (the largest period those ranks inferred), else 1, as ``variant``
    sets it for the shard's shape."""
    fitting = [p for p in candidate_periods(math.prod(shape)) if informed % p == 0]
    return variant.period(shape, max(fitting, default=1))


def first_histogram(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    periods: Sequence[int],
    negate: Sequence[bool],
    variant: Variant,
) -> torch.Tensor | None:
    """The codebook's histogram (int64 counts on CPU) of the first gradients of ``params``
    (local tensors; negated where ``negate``: maximize), or None when they hold no element.
    Summed over the ranks that hold shards of DTensor parameters (distributed.global_histogram)."""
    rows = [variant.histogram_row(g.numel(), period) for g, period in zip(grads, periods)]
    counts = global_histogram(params, grads, rows, negate)
    return None if counts is None else counts.cpu()
