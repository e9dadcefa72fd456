"""Gefen's global codebook: histogram of normalised first gradients and its exact 1-D k-means.

GEFEN_SPEC "Codebook": 4096 equal bins over [-1, 1]; the codebook is the exact weighted k-means
of the non-empty bin centres into 256 contiguous clusters whose first and last centres are
pinned to -1 and +1.

The dynamic program (kernels/codebook_dp.c; :class:`_ClusterCosts` in numpy where the C library
is not built) works in integer bin coordinates: centre of bin b is ``y * 2**-12`` with
``y = 2b + 1 - 4096``, and counts are integers, so every prefix sum is exact in int64 and a
cluster's cost is computed about its first point, which avoids cancellation. The cluster cost
satisfies the quadrangle inequality, so each layer's optimal split points are monotone and a
divide and conquer finds them in O(B log B). Both solvers do the same float64 operations in the
same order and keep the leftmost of tied splits, so they return the same edges and cost.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .kernels import native
from .variant import ROBUST, Variant

NUM_BINS = 4096
CODEBOOK_SIZE = 256
# Bin centres are Y_SCALE * y for odd integers y in [-4095, 4095]; the pinned ends are y = +-4096.
Y_SCALE = 2.0**-12
_END = NUM_BINS
# Keeps sum(w * (y - a)^2) with |y - a| <= 8192 inside int64.
_MAX_TOTAL_COUNT = 2**36
# Elements normalised and binned at once, so the histogram never copies a whole large gradient.
_HISTOGRAM_CHUNK = 1 << 20


def gradient_histogram(grad: torch.Tensor, row: int) -> torch.Tensor:
    """Counts (int64, ``NUM_BINS``, on ``grad``'s device) of ``grad`` viewed as rows of ``row``
    elements (the last row holds what remains), each row divided by its max |g| in fp32 (zero
    rows count as 0).

    Plain torch ops, no host round trip: the CUDA path (the CPU path is the C kernel in
    kernels/cpu_step.c)."""
    flat = grad.detach().reshape(-1)
    whole = flat.numel() - flat.numel() % row
    counts = torch.zeros(NUM_BINS, dtype=torch.int64, device=grad.device)
    rows_per_chunk = max(1, _HISTOGRAM_CHUNK // row)
    for chunk in (*flat[:whole].view(-1, row).split(rows_per_chunk), flat[whole:].view(1, -1)):
        if chunk.numel() == 0:
            continue
        chunk = chunk.float()
        peak = chunk.abs().amax(dim=1, keepdim=True)
        normalised = torch.where(peak > 0, chunk / peak, 0.0)
        # (v + 1) rounds in fp32 as published; the scale by 2048 is exact.
        bins = ((normalised + 1.0) * (NUM_BINS / 2)).floor_().clamp_(0, NUM_BINS - 1)
        index = bins.long().reshape(-1)
        # index_add_, not bincount: bincount reads its largest index back to the host (a sync
        # per chunk on CUDA). Integer sums: the same counts in any order.
        one = torch.ones(1, dtype=torch.int64, device=index.device)
        counts.index_add_(0, index, one.expand(index.numel()))
    return counts


def is_thin(counts: torch.Tensor, variant: Variant = ROBUST, size: int = CODEBOOK_SIZE) -> bool:
    """Whether ``counts`` has too few non-empty bins for ``size`` distinct entries, so that
    :func:`learn_codebook` pads its codebook with repeats (GEFEN_SPEC "Codebook")."""
    return int(torch.count_nonzero(counts)) < size - variant.zero_in_codebook


def bin_centres(bins: torch.Tensor | np.ndarray) -> np.ndarray:
    """Centres in [-1, 1] (float64) of the given bin indices."""
    return (2 * np.asarray(bins, dtype=np.int64) + 1 - NUM_BINS) * Y_SCALE


def learn_codebook(counts: torch.Tensor, variant: Variant = ROBUST,
                   size: int = CODEBOOK_SIZE) -> torch.Tensor:
    """The codebook (float32, ``size`` entries, ascending, on CPU) for a bin-count histogram:
    pinned entries -1 and +1, and 0.0 too where ``variant.zero_in_codebook``."""
    counts_np = _validated_counts(counts)
    bins = np.flatnonzero(counts_np)
    zero = variant.zero_in_codebook
    if len(bins) < size - zero:  # is_thin
        # As published: the non-empty centres padded with the last one, ends pinned to -1 and
        # +1; the robust variant turns one padded copy into 0.0.
        centres = bin_centres(bins)
        padded = np.concatenate([centres, np.full(size - len(bins), centres[-1])])
        padded[0], padded[-1] = -1.0, 1.0
        if zero:
            padded[len(bins)] = 0.0
        return torch.from_numpy(np.sort(padded)).float()
    centres, _ = optimal_clustering(counts_np, size, zero)
    return torch.from_numpy(centres).float()


def optimal_clustering(counts: torch.Tensor | np.ndarray, k: int,
                       zero: bool = False) -> tuple[np.ndarray, float]:
    """Exact weighted k-means of the non-empty bin centres into ``k`` contiguous clusters, the
    first centred at -1 and the last at +1; with ``zero``, one more cluster, possibly empty,
    is centred at 0.0 (its cost is sum w y^2).

    Returns the ``k`` centres (float64, ascending) and the optimal cost
    ``sum(count * (centre_of_bin - centre_of_its_cluster)^2)``. Needs ``2 <= k <=`` number of
    non-empty bins (``3 <= k <=`` that number + 1 with ``zero``).
    """
    counts_np = _validated_counts(counts)
    bins = np.flatnonzero(counts_np)
    nonempty = k - zero  # clusters that hold points
    if not 2 <= nonempty <= len(bins):
        raise ValueError(
            f"k={k} clusters need {2 + zero} <= k <= {len(bins) + zero} (the number of "
            f"non-empty bins{' + 1: the zero cluster may be empty' if zero else ''})"
        )
    y = 2 * bins.astype(np.int64) + 1 - NUM_BINS
    w = counts_np[bins].astype(np.int64)
    costs = _ClusterCosts(y, w)
    edges, zero_cluster, cost = (_edges_with_zero if zero else _edges)(costs, nonempty)
    lo, hi = edges[:-1], edges[1:]
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty zero cluster: set below
        centres = (costs.w_y[hi] - costs.w_y[lo]) / (costs.w_1[hi] - costs.w_1[lo]) * Y_SCALE
    centres[0], centres[-1] = -1.0, 1.0
    if zero_cluster is not None:
        centres[zero_cluster] = 0.0
    return np.sort(centres), cost * Y_SCALE**2


def _validated_counts(counts: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu().numpy()
    counts = np.asarray(counts)
    if counts.shape != (NUM_BINS,) or counts.dtype.kind not in "iu" or (counts < 0).any():
        raise ValueError(
            f"counts must be {NUM_BINS} non-negative integers (a gradient_histogram), "
            f"got shape {counts.shape} and dtype {counts.dtype}"
        )
    total = int(counts.sum())
    if total == 0:
        raise ValueError("counts is empty: the codebook needs at least one gradient element")
    if total > _MAX_TOTAL_COUNT:
        raise ValueError(
            f"the histogram counts {total} elements, above the {_MAX_TOTAL_COUNT} that the "
            "exact int64 codebook solver supports"
        )
    return counts


class _ClusterCosts:
    """Costs of contiguous clusters of integer points ``y`` with integer weights ``w``."""

    def __init__(self, y: np.ndarray, w: np.ndarray):
        zero = np.zeros(1, dtype=np.int64)
        self.y, self.weights = y, w
        self.n = len(y)
        self.w_1 = np.concatenate([zero, np.cumsum(w)])
        self.w_y = np.concatenate([zero, np.cumsum(w * y)])
        self.w_yy = np.concatenate([zero, np.cumsum(w * y * y)])

    def _moments_about(self, i, j, a):
        """sum(w), sum(w (y - a)), sum(w (y - a)^2) over points i..j-1, exactly."""
        w = self.w_1[j] - self.w_1[i]
        wy = self.w_y[j] - self.w_y[i]
        wyy = self.w_yy[j] - self.w_yy[i]
        return w, wy - a * w, wyy - 2 * a * wy + a * a * w

    def free(self, i, j):
        """Cost of points i..j-1 about their weighted mean (taken about point i: no cancellation)."""
        w, d, dd = self._moments_about(i, j, self.y[i])
        return dd - d.astype(np.float64) ** 2 / w

    def pinned(self, i, j, centre: int):
        """Cost of points i..j-1 about a fixed centre."""
        return self._moments_about(i, j, centre)[2].astype(np.float64)

    def layers(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """What :func:`_layers` returns, in numpy."""
        n = self.n
        best = np.full((count + 1, n + 1), np.inf)
        split = np.zeros((count + 1, n + 1), dtype=np.int64)
        ends = np.arange(1, n + 1)
        best[1, ends] = self.pinned(0, ends, -_END)
        for layer in range(2, min(count, n) + 1):
            best[layer] = self._next_layer(best[layer - 1], split[layer - 1], layer, n,
                                           split[layer])
        return best, split

    def _next_layer(self, prev: np.ndarray, prev_split: np.ndarray, layer: int, last_end: int,
                    split: np.ndarray):
        """Optimal costs with one more free cluster, ending at ``layer..last_end``.

        Row minima of a Monge matrix: the leftmost optimal split is monotone in the end, so
        each depth of the divide and conquer scans every candidate once, all rows together;
        the previous layer's split at an end bounds it from below (as in codebook_dp.c).
        """
        cur = np.full(self.n + 1, np.inf)
        lo_end, hi_end = np.array([layer]), np.array([last_end])
        lo_split, hi_split = np.array([layer - 1]), np.array([last_end - 1])
        while lo_end.size:
            end = (lo_end + hi_end) // 2
            last = np.minimum(hi_split, end - 1)
            lowest = np.minimum(np.maximum(lo_split, prev_split[end]), last)
            count = last - lowest + 1
            first = np.cumsum(count) - count
            row = np.repeat(np.arange(len(count)), count)
            start = np.arange(int(count.sum())) - first[row] + lowest[row]
            values = prev[start] + self.free(start, end[row])
            row_min = np.minimum.reduceat(values, first)
            at_min = np.where(values == row_min[row], start, self.n)
            arg = np.minimum.reduceat(at_min, first)
            cur[end], split[end] = row_min, arg
            left, right = lo_end < end, end < hi_end
            lo_end, hi_end, lo_split, hi_split = (
                np.concatenate([lo_end[left], end[right] + 1]),
                np.concatenate([end[left] - 1, hi_end[right]]),
                np.concatenate([lo_split[left], arg[right]]),
                np.concatenate([arg[left], hi_split[right]]),
            )
        return cur


def _layers(costs: _ClusterCosts, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The DP's layers 1..count: ``best[c, j]``, the optimal cost of points 0..j-1 in c
    non-empty clusters, the first pinned at -1, the others free (inf past the number of points:
    no solution), and ``split[c, j]``, where the last of those clusters starts. In C
    (kernels/codebook_dp.c) where it is built."""
    if native.library is None:
        # Once per run, on the first step, also on CUDA, so not worth the warning of a CPU step.
        return costs.layers(count)
    n = costs.n
    solved = min(count, n)
    # Uninitialised where the C fills it: zeroing first would fault in every page twice.
    best = np.empty((count + 1, n + 1))
    best[solved + 1 :] = np.inf
    split = np.empty((count + 1, n + 1), dtype=np.int64)
    status = native.library.gefen_codebook_layers(
        n, costs.y.ctypes.data, costs.weights.ctypes.data, solved, _END, best.ctypes.data,
        split.ctypes.data,
    )
    if status != 0:
        raise MemoryError(f"the codebook's dynamic program ran out of memory ({n} points)")
    return best, split


def _backtrack(split: np.ndarray, clusters: int, end: int) -> list[int]:
    """Edges 0 = e_0 < ... < e_clusters = ``end`` of the optimal first ``clusters`` layers."""
    edges = [end]
    for layer in range(clusters, 1, -1):
        edges.append(int(split[layer, edges[-1]]))
    return [0, *edges[::-1]]


def _edges(costs: _ClusterCosts, k: int) -> tuple[np.ndarray, None, float]:
    """The published DP: k non-empty clusters, the first pinned at -1 and the last at +1."""
    n = costs.n
    best, split = _layers(costs, k - 1)
    starts = np.arange(k - 1, n)
    totals = best[k - 1, starts] + costs.pinned(starts, n, _END)
    last = int(starts[np.argmin(totals)])
    return np.array([*_backtrack(split, k - 1, last), n]), None, float(totals.min())


def _edges_with_zero(costs: _ClusterCosts, nonempty: int) -> tuple[np.ndarray, int, float]:
    """The robust DP: ``nonempty`` non-empty clusters, the first pinned at -1 and the last at
    +1, and between them one more, possibly empty, pinned at 0.

    Left of the zero cluster [a, b) lie c clusters (the DP's layers from the left), right of
    it ``nonempty - c`` (the same DP on the mirrored points). The zero cluster's cost
    S[b] - S[a] (S: prefix sums of w y^2) separates, so for every c and b the best a comes
    from a running minimum: O(K B) beside the two DPs.
    """
    n = costs.n
    # Each DP takes only its side's points (half the work): in an optimal solution, the
    # clusters left of the zero cluster hold only points below 0 and those right of it only
    # points above (or a single point, where a side has none, for its pinned end). Otherwise
    # the cost drops strictly: a pinned end holding more than its one point gives its last one
    # to the next cluster; a free cluster holding a point of the other sign trades points with
    # the zero cluster (an empty one moved next to it first). Where the zero cluster is empty
    # and no cluster spans 0, moving it to the sign change costs nothing and moves no centre.
    below = int(np.searchsorted(costs.y, 0))  # the points are odd integers: none is 0
    left = _ClusterCosts(costs.y[: max(below, 1)], costs.weights[: max(below, 1)])
    right_points = max(n - below, 1)
    mirrored = _ClusterCosts(-costs.y[::-1][:right_points].copy(),
                             costs.weights[::-1][:right_points].copy())
    # The two DPs are independent: side by side where there are threads (the C one and
    # numpy's loops run without the GIL).
    with ThreadPoolExecutor(min(2, torch.get_num_threads())) as pool:
        right = pool.submit(_layers, mirrored, nonempty - 1)
        left_best, left_split = _layers(left, nonempty - 1)
        right_best, right_split = right.result()
    squares = costs.w_yy.astype(np.float64)  # S
    # The zero cluster [a, b) starts within the left side's points and ends within the right
    # side's: a <= left.n, b >= first = n - mirrored.n. Row c - 1 of the tables below: c
    # clusters left of it (1 <= c < nonempty), column b - first.
    first = n - mirrored.n
    # points b..n-1 in nonempty - c clusters: the mirrored DP's points 0..n-b-1 (a view)
    totals = right_best[nonempty - 1 : 0 : -1, ::-1] + squares[first:]
    # min over a <= b of left_best[c, a] - S[a], for every c and b: past the left side's
    # points, the minimum over all of them
    running = left_best[1:nonempty] - squares[: left.n + 1]
    np.minimum.accumulate(running, axis=1, out=running)
    inside = max(left.n - first, 0)  # ends b before the left side's last point
    totals[:, :inside] += running[:, first : first + inside]
    totals[:, inside:] += running[:, left.n, None]
    row, column = np.unravel_index(np.argmin(totals), totals.shape)
    c, b = int(row) + 1, first + int(column)
    a = int(np.argmin(left_best[c, : b + 1] - squares[: min(b, left.n) + 1]))
    right_edges = [n - e for e in _backtrack(right_split, nonempty - c, n - b)][::-1]
    edges = np.array([*_backtrack(left_split, c, a), *right_edges])
    return edges, c, float(totals[row, column])


@dataclass(frozen=True)
class LookupTables:
    """What a kernel needs to find nearest codes: see :class:`NearestCode`."""

    codebook: torch.Tensor  # entries, in the compute dtype
    lut: torch.Tensor  # int32 [2 * half]: boundaries below each cell
    bounds: torch.Tensor  # compute dtype: boundaries between distinct entries, then +inf
    first_index: torch.Tensor  # int32: number of boundaries below a value -> its code
    half: int  # cells per unit length; a power of two

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """int64 codes of values ``x`` (the tables' dtype and device, any shape); NaN gives 0."""
        cell = (x * self.half).floor_().nan_to_num_(-self.half).clamp_(-self.half, self.half - 1)
        below = self.lut[cell.long() + self.half].long()
        below += x > self.bounds[below]
        return self.first_index[below].long()


class NearestCode:
    """Maps values to the index of their nearest codebook entry, ties to the lower index.

    Decisions are exact: the midpoint of two fp32 entries is exact in float64, and for fp32
    values ``x > midpoint`` is the same test as ``x > midpoint rounded down to fp32``. The code is
    the number of boundaries below ``x``; a uniform grid of cells over [-1, 1), fine enough to
    hold at most one boundary per cell, gives that count with one table read and one comparison
    (``x * half`` is exact, so the cell is too).
    """

    def __init__(self, codebook: torch.Tensor):
        values = codebook.detach().cpu().double()
        # Equal entries (padded codebooks) resolve to the first of their run.
        first = torch.ones_like(values, dtype=torch.bool)
        first[1:] = values[1:] != values[:-1]
        first_index = first.nonzero().reshape(-1)
        distinct = values[first_index]
        mid64 = (distinct[:-1] + distinct[1:]) / 2
        mid32 = mid64.float()
        mid32 = torch.where(mid32.double() > mid64, torch.nextafter(mid32, -_INF32), mid32)
        self._host = {
            dtype: _lookup_tables(values.to(dtype), mids, first_index.to(torch.int32))
            for dtype, mids in ((torch.float32, mid32), (torch.float64, mid64))
        }
        self._on_device: dict[tuple[torch.device, torch.dtype], LookupTables] = {}

    def tables(self, device: torch.device, dtype: torch.dtype) -> LookupTables:
        """The lookup tables for values of ``dtype`` (fp32 or fp64) on ``device``."""
        key = (torch.device(device), dtype)
        if key not in self._on_device:
            host = self._host[dtype]
            self._on_device[key] = LookupTables(
                *(t.to(device) for t in (host.codebook, host.lut, host.bounds, host.first_index)),
                half=host.half,
            )
        return self._on_device[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """int64 codes of fp32 or fp64 values ``x`` (any shape, same device); NaN gives 0."""
        return self.tables(x.device, x.dtype).codes(x)


_INF32 = torch.tensor(float("inf"), device="cpu")  # whatever the default device at import
_MAX_LUT_LOG2 = 22


def _lookup_tables(entries: torch.Tensor, mids: torch.Tensor, first_index) -> LookupTables:
    """The coarsest grid with at most one boundary per cell, and its table."""
    inf = torch.full((1,), float("inf"), dtype=mids.dtype, device=mids.device)
    for log2 in range(12, _MAX_LUT_LOG2 + 1):
        half = 2**log2
        cells = (mids.double() * half).floor()
        if bool((cells[1:] > cells[:-1]).all()):
            edges = torch.arange(-half, half, dtype=torch.float64, device=mids.device) / half
            lut = torch.searchsorted(mids.double(), edges, side="left").to(torch.int32)
            return LookupTables(entries, lut, torch.cat([mids, inf]), first_index, half)
    raise ValueError(
        "codebook entries closer than 2**-22 apart: not a Gefen codebook (load the one the "
        "optimizer learned, or let it learn one at the first step)"
    )
