"""Period inference against the slow reference (GEFEN_SPEC "Period inference")."""

import pytest
import torch
from reference import ref_period

from gefen_compile.first_step import infer_period
from gefen_compile.variant import PUBLISHED, ROBUST
from gefen_compile.partition import (
    candidate_periods,
    period_scores,
    scored_candidates,
    select_period,
)


def rows_of_scales(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A weight-gradient-like tensor: each row its own scale, the way real gradients are."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(2 * torch.randn(rows, 1, generator=gen))
    return scales * torch.randn(rows, cols, generator=gen)


STRUCTURED = {
    "rows 64x48": lambda: rows_of_scales(64, 48, 0),
    "rows 96x12": lambda: rows_of_scales(96, 12, 1),
    "columns 48x64": lambda: rows_of_scales(64, 48, 2).T.contiguous(),
    "3-D 6x10x20": lambda: rows_of_scales(60, 20, 3).reshape(6, 10, 20),
    "3-D heads 4x32x16": lambda: (
        torch.exp(torch.randn(4, 1, 1)) * rows_of_scales(128, 16, 4).reshape(4, 32, 16)
    ),
    "period above 1024": lambda: rows_of_scales(8, 2048, 5),
    "period above 1024, odd divisor": lambda: rows_of_scales(8, 3 * 1031, 6),
    "wide rows 4x4096": lambda: rows_of_scales(4, 4096, 7),
    "rows with zero rows": lambda: rows_of_scales(32, 40, 8) * (torch.arange(32) % 3 > 0)[:, None],
    "mostly zero": lambda: torch.zeros(50, 30).index_fill_(0, torch.tensor([3, 17]), 1.5),
}
RANDOM = {
    "iid 1000": lambda: torch.randn(1000, generator=torch.Generator().manual_seed(9)),
    "iid 37x41": lambda: torch.randn(37, 41, generator=torch.Generator().manual_seed(10)),
    "heavy tails 720": lambda: torch.randn(720, generator=torch.Generator().manual_seed(11)) ** 5,
}
SMALL = {
    "n = 1": lambda: torch.tensor([0.3]),
    "n = 1 zero": lambda: torch.zeros(1),
    "prime 7919": lambda: torch.randn(7919, generator=torch.Generator().manual_seed(12)),
    "prime 2": lambda: torch.tensor([1.0, -2.0]),
    "tiny 8": lambda: torch.arange(8.0),
    "tiny 12": lambda: torch.randn(12, generator=torch.Generator().manual_seed(13)),
    "tiny 3x4": lambda: rows_of_scales(3, 4, 14),
    "all zero 4096": lambda: torch.zeros(64, 64),
    "all equal 256": lambda: torch.full((16, 16), 0.25),
    "bias 768": lambda: torch.randn(768, generator=torch.Generator().manual_seed(15)) * 1e-3,
}
CASES = {**STRUCTURED, **RANDOM, **SMALL}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_period_equals_reference(name, dtype):
    grad = CASES[name]().to(dtype)
    assert infer_period(grad, PUBLISHED) == ref_period(grad)


@pytest.mark.parametrize("name", ["rows 96x12", "3-D 6x10x20", "period above 1024"])
def test_structured_gradients_find_their_row_length(name):
    grad = CASES[name]()
    assert infer_period(grad, PUBLISHED) == grad.shape[-1]


def test_large_period_is_cut_to_smallest_divisor_above_1024():
    assert infer_period(CASES["period above 1024"](), PUBLISHED) == 2048
    # The peak is at the row length 3093 = 3 * 1031; its smallest divisor above 1024 is 1031.
    assert infer_period(CASES["period above 1024, odd divisor"](), PUBLISHED) == 1031


def test_constant_gradients_score_exactly_zero():
    # Equal block means must tie exactly, or rounding would invent a peak.
    for grad in (torch.zeros(4096), torch.full((720,), -3.5)):
        scores = period_scores(grad, candidate_periods(grad.numel()))
        assert set(scores.tolist()) == {0.0}
        assert infer_period(grad, PUBLISHED) == 1


def test_candidates_are_divisors_with_four_blocks():
    assert candidate_periods(48) == [1, 2, 3, 4, 6, 8, 12]
    assert candidate_periods(7) == [1]
    assert candidate_periods(1) == []


def test_select_period_ties_go_to_larger_p():
    scores = {1: 0.0, 2: 0.0, 16: 1.0, 32: 0.5, 64: 1.0, 128: 0.0, 256: 0.0}
    assert select_period(sorted(scores), scores) == 64


def test_peak_needs_p_above_8():
    scores = {1: 0.0, 2: 0.0, 4: 1.0, 8: 0.5, 16: 0.1}
    assert select_period(sorted(scores), scores) == 1


def test_only_scores_that_can_matter_are_computed():
    assert scored_candidates(candidate_periods(48)) == [8, 12]
    assert scored_candidates(candidate_periods(7919)) == []  # one candidate: period 1
    assert scored_candidates([1, 2, 4, 16, 32]) == [4, 16, 32]


@pytest.mark.parametrize(
    ("n", "period", "published", "robust"),
    [(4096, 64, 64, 64), (4096, 1, 256, 256), (7919, 1, 1, 256), (768, 1, 256, 256),
     (1000, 1, 250, 256), (1, 1, 1, 1), (37, 1, 37, 37)],
)
def test_magnitude_block(n, period, published, robust):
    """Published: Q, the largest divisor of n up to 256; robust: 256 elements (the last block
    shorter), or the whole tensor below 256."""
    assert PUBLISHED.magnitude_block(n, period) == published
    assert ROBUST.magnitude_block(n, period) == robust


@pytest.mark.parametrize("variant", ["published", "robust"])
def test_histogram_rows(variant):
    """Published: rows of the period (one element for period 1); robust: the magnitude blocks."""
    rules = PUBLISHED if variant == "published" else ROBUST
    assert rules.histogram_row(4096, 64) == 64
    assert rules.histogram_row(1000, 1) == (1 if variant == "published" else 256)
