"""Histogram, exact DP codebook and nearest-code lookup against the slow reference."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    brute_force_cost,
    partition_cost,
    points,
    ref_codebook,
    ref_histogram,
    ref_nearest,
    slow_dp,
    slow_dp_zero,
)

from gefen_compile.codebook import (
    CODEBOOK_SIZE,
    NUM_BINS,
    NearestCode,
    gradient_histogram,
    learn_codebook,
    optimal_clustering,
)
from gefen_compile import ops
from gefen_compile.kernels import native
from gefen_compile.variant import PUBLISHED, ROBUST

VARIANTS = {"published": PUBLISHED, "robust": ROBUST}


def realistic_counts(elements: int, period: int, seed: int) -> np.ndarray:
    """Histogram of a gradient whose rows have their own scales and heavy tails."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.exp(torch.randn(elements // period, 1, generator=gen))
    grad = rows * torch.randn(elements // period, period, generator=gen) ** 3
    return gradient_histogram(grad, period).numpy()


def sparse_counts(bins: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.zeros(NUM_BINS, dtype=np.int64)
    counts[rng.choice(NUM_BINS, bins, replace=False)] = rng.integers(1, 100, bins)
    return counts


@pytest.mark.parametrize(
    ("shape", "period", "dtype"),
    [
        ((40, 24), 24, torch.float32),
        ((40, 24), 1, torch.float32),
        ((3, 5, 16), 80, torch.bfloat16),
        ((7, 13), 13, torch.float16),
    ],
)
def test_histogram_equals_reference(shape, period, dtype):
    gen = torch.Generator().manual_seed(0)
    grad = (torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen)).to(dtype)
    grad.view(-1, period)[1] = 0  # a zero row normalises to 0
    counts = gradient_histogram(grad, period)
    assert counts.dtype == torch.int64 and counts.shape == (NUM_BINS,)
    np.testing.assert_array_equal(counts.numpy(), ref_histogram(grad, period))


@pytest.mark.parametrize("kernel", ["C", "torch"])
def test_ragged_rows_histogram_equals_reference(kernel):
    """Rows of 256 with a shorter last one (the robust variant's period-1 blocks), in the C
    kernel and in torch."""
    if kernel == "C" and native.library is None:
        pytest.skip("the C library is not built")
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(1000, generator=gen), torch.randn(257, generator=gen).bfloat16()]
    if kernel == "C":
        counts = ops.histogram(grads, [256, 256], [False, True]).numpy()
    else:
        counts = sum(gradient_histogram(g, 256) for g in (grads[0], -grads[1])).numpy()
    expected = ref_histogram(grads[0], 256) + ref_histogram(-grads[1], 256)
    np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_c_histogram_keeps_non_finite_values_in_bounds(dtype):
    """The first step refuses such gradients before any histogram; the C kernel still keeps
    every count in bounds (a NaN bin once became an index of -2**31 and a write far out of
    the table)."""
    if native.library is None:
        pytest.skip("the C library is not built")
    grad = torch.tensor([1.0, float("nan"), 1e39, -2.0, float("inf")], dtype=dtype)
    counts = ops.histogram([grad], [5], [False])
    assert counts.sum() == grad.numel()


def test_histogram_bin_edges():
    # -1 -> bin 0, +1 clamps into the last bin, 0 -> the middle bin.
    grad = torch.tensor([-1.0, 1.0, 0.0, 0.5])
    counts = gradient_histogram(grad, 4)
    assert counts[0] == 1 and counts[NUM_BINS - 1] == 1
    assert counts[NUM_BINS // 2] == 1 and counts[3 * NUM_BINS // 4] == 1


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("seed", range(30))
def test_dp_cost_equals_brute_force(seed, zero):
    """Published: -1 and +1 pinned; robust (zero): 0 pinned too, its cluster possibly empty."""
    rng = np.random.default_rng(seed)
    bins = int(rng.integers(2, 8 if zero else 10))
    k = int(rng.integers(2 + zero, bins + 1 + zero))
    counts = sparse_counts(bins, seed)
    centres, cost = optimal_clustering(counts, k, zero)
    assert centres[0] == -1.0 and centres[-1] == 1.0 and (0.0 in centres) == zero
    assert cost == pytest.approx(brute_force_cost(counts, k, zero), rel=1e-12, abs=1e-15)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(bins=st.integers(4, 160), spread=st.sampled_from([1, 30, 10**6]),
       seed=st.integers(0, 2**31), zero=st.booleans(), data=st.data())
def test_dp_is_optimal_on_random_histograms(bins, spread, seed, zero, data):
    """Many layers over few points, weights equal (ties everywhere) or spread over six
    decades: the C and the numpy DP (divide and conquer, bounded below by the previous layer's
    splits) both reach the O(B^2 K) reference's optimum."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(NUM_BINS, dtype=np.int64)
    chosen = rng.choice(NUM_BINS, bins, replace=False)
    counts[chosen] = np.exp(rng.uniform(0, np.log(spread), bins)).astype(np.int64) + 1
    k = data.draw(st.integers(2 + zero, min(bins + zero, 48)), label="k")
    _, slow_cost = (slow_dp_zero if zero else slow_dp)(counts, k)
    libraries = [native.library, None] if native.library is not None else [None]
    for library in libraries:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(native, "library", library)
            _, cost = optimal_clustering(counts, k, zero)
        assert cost == pytest.approx(slow_cost, rel=1e-9, abs=1e-12), library


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    ("elements", "period", "seed"), [(2000, 40, 0), (3000, 3, 1), (6000, 100, 2)]
)
def test_codebook_is_optimal_on_realistic_histograms(elements, period, seed, variant):
    counts = realistic_counts(elements, period, seed)
    assert np.count_nonzero(counts) >= CODEBOOK_SIZE
    zero = variant == "robust"
    centres, cost = optimal_clustering(counts, CODEBOOK_SIZE, zero)
    _, slow_cost = (slow_dp_zero if zero else slow_dp)(counts, CODEBOOK_SIZE)
    assert cost == pytest.approx(slow_cost, rel=1e-9)
    # The learned codebook achieves that optimum: assigning every point to its nearest
    # entry (the optimal partition is contiguous and nearest-consistent) costs the same.
    codebook = learn_codebook(torch.from_numpy(counts), VARIANTS[variant])
    assert (0.0 in codebook.tolist()) == zero
    x, w = points(counts)
    nearest = codebook.double().numpy()[ref_nearest(x, codebook.numpy())]
    assert float((w * (x - nearest) ** 2).sum()) == pytest.approx(slow_cost, rel=1e-6)
    np.testing.assert_allclose(codebook.numpy(), centres.astype(np.float32))


def one_sided_counts(negative: int, positive: int, seed: int) -> np.ndarray:
    """Counts in ``negative`` random bins below 0 and ``positive`` above it."""
    rng = np.random.default_rng(seed)
    counts = np.zeros(NUM_BINS, dtype=np.int64)
    half = NUM_BINS // 2
    bins = [*rng.choice(half, negative, replace=False),
            *(half + rng.choice(half, positive, replace=False))]
    counts[bins] = rng.integers(1, 1000, len(bins))
    return counts


@pytest.mark.parametrize(("negative", "positive"), [(0, 300), (300, 0), (1, 280), (280, 1),
                                                    (2, 2), (0, 4), (150, 150)])
def test_robust_dp_is_optimal_whatever_the_signs_of_the_points(negative, positive):
    """The robust DP solves each side of 0 on that side's points alone: still optimal where a
    side has no point or one (its pinned cluster must hold one), and with few points."""
    counts = one_sided_counts(negative, positive, negative + positive)
    k = min(CODEBOOK_SIZE, negative + positive + 1)
    centres, cost = optimal_clustering(counts, k, zero=True)
    _, slow_cost = slow_dp_zero(counts, k)
    assert cost == pytest.approx(slow_cost, rel=1e-9, abs=1e-15)
    assert centres[0] == -1.0 and centres[-1] == 1.0 and 0.0 in centres


@pytest.mark.parametrize("variant", VARIANTS)
def test_codebook_shape_dtype_and_pinned_ends(variant):
    codebook = learn_codebook(torch.from_numpy(realistic_counts(4000, 50, 3)), VARIANTS[variant])
    assert codebook.dtype == torch.float32 and codebook.shape == (CODEBOOK_SIZE,)
    assert codebook[0] == -1.0 and codebook[-1] == 1.0
    assert bool((codebook[1:] > codebook[:-1]).all())


def test_all_bins_nonempty_is_solved_and_optimal():
    counts = np.random.default_rng(4).integers(1, 1000, NUM_BINS)
    centres, cost = optimal_clustering(counts, CODEBOOK_SIZE)
    x, w = points(counts)
    edges = np.searchsorted(x, (centres[:-1] + centres[1:]) / 2)
    assert len(centres) == CODEBOOK_SIZE
    assert cost <= partition_cost(x, w, (0, *edges, len(x))) * (1 + 1e-9)


@pytest.mark.parametrize("bins", [1, 2, 3, 100, CODEBOOK_SIZE - 1])
def test_padded_codebook(bins):
    counts = sparse_counts(bins, bins)
    codebook = learn_codebook(torch.from_numpy(counts), PUBLISHED)
    np.testing.assert_array_equal(codebook.numpy(), ref_codebook(counts))
    x, _ = points(counts)
    expected = np.sort(np.concatenate([[-1.0], x[1:], np.full(CODEBOOK_SIZE - bins, x[-1])]))
    expected[-1] = 1.0
    if bins == 1:  # its one centre is overwritten by -1, its copies stay, the last becomes +1
        expected = np.concatenate([[-1.0], np.full(CODEBOOK_SIZE - 2, x[0]), [1.0]])
    np.testing.assert_array_equal(codebook.numpy(), expected.astype(np.float32))


@pytest.mark.parametrize("bins", [1, 2, 100, CODEBOOK_SIZE - 2, CODEBOOK_SIZE - 1])
def test_robust_padded_codebook_holds_zero(bins):
    """Robust: the published padding with one padded copy turned into 0.0; from 255 non-empty
    bins on (the zero cluster may be empty) the DP runs."""
    counts = sparse_counts(bins, bins)
    codebook = learn_codebook(torch.from_numpy(counts), ROBUST)
    np.testing.assert_array_equal(codebook.numpy(), ref_codebook(counts, zero=True))
    assert 0.0 in codebook.tolist() and codebook[0] == -1.0 and codebook[-1] == 1.0


@pytest.mark.parametrize(
    "counts",
    [np.zeros(NUM_BINS, dtype=np.int64), np.ones(10, dtype=np.int64), np.full(NUM_BINS, 1.5)],
)
def test_bad_counts_are_refused(counts):
    with pytest.raises(ValueError, match="counts"):
        learn_codebook(torch.from_numpy(counts))


def test_k_outside_range_is_refused():
    with pytest.raises(ValueError, match="k=5"):
        optimal_clustering(sparse_counts(4, 0), 5)


CODEBOOKS = {
    "learned": lambda: learn_codebook(torch.from_numpy(realistic_counts(4000, 50, 5))),
    "padded with duplicates": lambda: learn_codebook(torch.from_numpy(sparse_counts(20, 6))),
}


@pytest.mark.parametrize("name", CODEBOOKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_code_equals_argmin(name, dtype):
    codebook = CODEBOOKS[name]()
    c = codebook.double()
    gen = torch.Generator().manual_seed(7)
    mids = (c[:-1] + c[1:]) / 2
    values = torch.cat(
        [
            torch.rand(20000, generator=gen, dtype=torch.float64) * 2.2 - 1.1,
            c,  # entries themselves
            mids,  # exact ties (in fp64) between neighbours go to the lower index
            torch.nextafter(mids.to(dtype), torch.tensor(2.0, dtype=dtype)).double(),
            torch.nextafter(mids.to(dtype), torch.tensor(-2.0, dtype=dtype)).double(),
        ]
    ).to(dtype)
    expected = ref_nearest(values.double().numpy(), codebook.numpy())
    np.testing.assert_array_equal(NearestCode(codebook)(values).numpy(), expected)


@pytest.mark.parametrize(
    ("counts", "k"),
    [
        (realistic_counts(2000, 40, 0), CODEBOOK_SIZE),
        (realistic_counts(6000, 100, 2), CODEBOOK_SIZE),
        (np.random.default_rng(4).integers(1, 1000, NUM_BINS), CODEBOOK_SIZE),
        (sparse_counts(300, 8), 17),
        (sparse_counts(9, 9), 9),
        # Equal weights at symmetric points: tied splits, where both keep the leftmost.
        (np.repeat([0, 5], NUM_BINS // 2), 40),
    ],
)
@pytest.mark.parametrize("zero", [False, True])
def test_numpy_dp_equals_c_dp(monkeypatch, counts, k, zero):
    """Without the C library the codebook's dynamic program runs in numpy: the same float64
    operations in the same order, so the same cost, bit for bit, and the same clusters."""
    if native.library is None:
        pytest.skip("the C library is not built")
    c_centres, c_cost = optimal_clustering(counts, k, zero)
    monkeypatch.setattr(native, "library", None)
    centres, cost = optimal_clustering(counts, k, zero)
    assert cost == c_cost
    np.testing.assert_array_equal(centres, c_centres)
