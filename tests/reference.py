"""A slow, literal implementation of GEFEN_SPEC, written independently of the package.

Loops and float64 wherever the spec leaves precision open; float32 exactly where the spec fixes
it (the normalisation g / max|g|, the bin arithmetic, and the first-moment math that feeds a
quantisation decision; float64 for float64 state, as the README documents), so that discrete
decisions can be compared bit for bit.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import torch

BINS = 4096
K = 256


def ref_period(grad: torch.Tensor) -> int:
    x = np.log(grad.detach().double().reshape(-1).numpy() ** 2 + 1e-12)
    n = x.size
    if n == 1:
        return 1
    cands = [p for p in range(1, n) if n % p == 0 and n // p >= 4]
    if len(cands) < 3:
        return 1
    scores = []
    for p in cands:
        means = [x[j * p:(j + 1) * p].mean() for j in range(n // p)]
        scores.append(np.mean([abs(means[j + 1] - means[j]) for j in range(len(means) - 1)]))
    best, best_score = 1, None
    for k in range(1, len(cands) - 1):
        p = cands[k]
        if p > 8 and scores[k] > scores[k - 1] and scores[k] > scores[k + 1]:
            if best_score is None or scores[k] > best_score or (
                scores[k] == best_score and p > best
            ):
                best, best_score = p, scores[k]
    if best > 1024:
        best = min(d for d in range(1025, best + 1) if n % d == 0 and best % d == 0)
    return best


def ref_histogram(grad: torch.Tensor, row_length: int) -> np.ndarray:
    """Counts of the rows of ``row_length`` elements (the last one holds what remains)."""
    counts = np.zeros(BINS, dtype=np.int64)
    flat = grad.detach().float().reshape(-1).numpy()
    for start in range(0, flat.size, row_length):
        row = flat[start:start + row_length]
        peak = np.float32(np.abs(row).max())
        for g in row:
            v = np.float32(0.0) if peak == 0 else np.float32(g) / peak
            b = int(math.floor(float(np.float32(v + np.float32(1.0))) / (2.0 / BINS)))
            counts[min(max(b, 0), BINS - 1)] += 1
    return counts


def points(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bins = np.flatnonzero(counts)
    return -1.0 + (bins + 0.5) * (2.0 / BINS), counts[bins].astype(np.float64)


def cluster_cost(x: np.ndarray, w: np.ndarray, centre: float | None) -> float:
    """Weighted squared error about ``centre`` (None: about the weighted mean)."""
    if centre is None:
        centre = float((w * x).sum() / w.sum())
    return float((w * (x - centre) ** 2).sum())


def partition_cost(x, w, edges) -> float:
    k = len(edges) - 1
    total = 0.0
    for c, (i, j) in enumerate(zip(edges[:-1], edges[1:])):
        centre = -1.0 if c == 0 else 1.0 if c == k - 1 else None
        total += cluster_cost(x[i:j], w[i:j], centre)
    return total


def brute_force_cost(counts: np.ndarray, k: int, zero: bool = False) -> float:
    """Every split of the points into k contiguous non-empty clusters; with ``zero``, every
    choice of one inner cluster centred at 0, which may be empty."""
    x, w = points(counts)
    n = len(x)
    if not zero:
        return min(partition_cost(x, w, (0, *cuts, n))
                   for cuts in itertools.combinations(range(1, n), k - 1))
    best = np.inf
    for z in range(1, k - 1):
        for cuts in itertools.combinations_with_replacement(range(1, n), k - 1):
            edges = (0, *cuts, n)
            if any(edges[c + 1] == edges[c] and c != z for c in range(k)):
                continue
            total = 0.0
            for c, (i, j) in enumerate(zip(edges[:-1], edges[1:])):
                centre = -1.0 if c == 0 else 1.0 if c == k - 1 else 0.0 if c == z else None
                total += cluster_cost(x[i:j], w[i:j], centre) if j > i else 0.0
            best = min(best, total)
    return best


def cost_tables(counts: np.ndarray) -> tuple:
    """The points (x, w), their number n, and every cluster cost: ``free[i, j]`` (points
    i..j-1 about their mean, inf unless j > i), ``squares[i, j]`` (about 0, inf unless j >= i),
    ``first[j]`` (points 0..j-1 about -1) and ``last[i]`` (points i..n-1 about +1)."""
    x, w = points(counts)
    n = len(x)
    cw = np.concatenate([[0.0], np.cumsum(w)])
    cx = np.concatenate([[0.0], np.cumsum(w * x)])
    cxx = np.concatenate([[0.0], np.cumsum(w * x * x)])
    i = np.arange(n + 1)[:, None]
    j = np.arange(n + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        sw, sx, sxx = cw[j] - cw[i], cx[j] - cx[i], cxx[j] - cxx[i]
        free = np.where(j > i, sxx - sx**2 / sw, np.inf)
    squares = np.where(j >= i, sxx, np.inf)
    first = cxx + 2 * cx + cw
    last = (cxx[n] - cxx) - 2 * (cx[n] - cx) + (cw[n] - cw)
    return x, w, n, free, squares, first, last


def slow_dp(counts: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """The O(B^2 K) dynamic program over every split point: (centres, optimal cost)."""
    x, w, n, free, _, first, last = cost_tables(counts)
    best = np.where(np.arange(n + 1) >= 1, first, np.inf)
    choices = []
    for _ in range(2, k):
        table = best[:, None] + free
        choices.append(table.argmin(axis=0))
        best = table.min(axis=0)
    totals = best[:n] + last[:n]
    edges = [n, int(np.argmin(totals))]
    for choice in reversed(choices):
        edges.append(int(choice[edges[-1]]))
    edges = [0] + edges[::-1]
    centres = [-1.0]
    for a, b in zip(edges[1:-2], edges[2:-1]):
        centres.append(float((w[a:b] * x[a:b]).sum() / w[a:b].sum()))
    centres.append(1.0)
    return np.array(centres), float(totals.min())


def slow_dp_zero(counts: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """The robust variant's DP, O(B^2 K): k clusters, the first pinned at -1, the last at +1,
    one in between pinned at 0 and allowed to be empty. Two tables per layer: without and with
    the zero cluster placed so far. Returns (sorted centres, optimal cost)."""
    x, w, n, free, zero, first, last = cost_tables(counts)
    without = np.where(np.arange(n + 1) >= 1, first, np.inf)
    placed = np.full(n + 1, np.inf)
    choices = []  # per layer: for "without" and "placed", (came from placed?, start)
    for _ in range(2, k):
        free_from_without = without[:, None] + free
        free_from_placed = placed[:, None] + free
        zero_from_without = without[:, None] + zero
        new_without = free_from_without.min(axis=0)
        candidates = np.stack([free_from_placed.min(axis=0), zero_from_without.min(axis=0)])
        kind = candidates.argmin(axis=0)  # 0: a free cluster after the zero one; 1: the zero one
        starts = np.where(kind == 0, free_from_placed.argmin(axis=0),
                          zero_from_without.argmin(axis=0))
        choices.append((free_from_without.argmin(axis=0), kind, starts))
        without, placed = new_without, candidates.min(axis=0)
    totals = placed[:n] + last[:n]
    end = int(np.argmin(totals))
    clusters = [(end, n, 1.0)]
    in_placed = True
    for from_without, kind, starts in reversed(choices):
        if in_placed:
            start = int(starts[end])
            centre = 0.0 if kind[end] == 1 else None
            in_placed = kind[end] == 0
        else:
            start, centre = int(from_without[end]), None
        clusters.append((start, end, centre))
        end = start
    clusters.append((0, end, -1.0))
    centres = [c if c is not None else float((w[a:b] * x[a:b]).sum() / w[a:b].sum())
               for a, b, c in clusters]
    return np.sort(np.array(centres)), float(totals.min())


def ref_nearest(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest entry, the lower index on a tie; near-ties are settled exactly."""
    c = codebook.astype(np.float64)
    d = np.abs(x.astype(np.float64)[:, None] - c[None, :])
    codes = np.argmin(d, axis=1)
    near_tie = np.sort(d, axis=1)[:, 1] - d[np.arange(len(x)), codes] <= 1e-9
    for i in np.flatnonzero(near_tie):
        exact = [abs(Fraction(float(x[i])) - Fraction(float(v))) for v in c]
        codes[i] = exact.index(min(exact))
    return codes


def _round(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Values (float64) as stored in ``dtype``, back in float64."""
    return torch.from_numpy(np.asarray(values, dtype=np.float64)).to(dtype).double().numpy()


class RefGefen:
    """GEFEN_SPEC's optimizer for a list of parameters in one group, one parameter at a time
    (``from_groups``: several groups, each with its own hyperparameters, one codebook)."""

    def __init__(self, params, lr, betas, eps, weight_decay, maximize=False, variant="robust"):
        self.params = [p.detach().clone() for p in params]
        self.hyper = [(lr, *betas, eps, weight_decay, maximize)] * len(params)
        self.codebook = None
        self.histogram = None  # robust: the counts of a provisional (thin) codebook
        self.state = [None] * len(params)
        self.robust = variant == "robust"

    @classmethod
    def from_groups(cls, groups, variant="robust"):
        """``groups``: dicts of "params" and every hyperparameter, as Gefen's param groups;
        parameters are numbered across the groups in order."""
        ref = cls([p for g in groups for p in g["params"]], 0.0, (0.0, 0.0), 0.0, 0.0,
                  variant=variant)
        ref.hyper = [
            (g["lr"], *g["betas"], g["eps"], g["weight_decay"], g.get("maximize", False))
            for g in groups
            for _ in g["params"]
        ]
        return ref

    def step(self, grads):
        grads = [None if g is None else (-g if h[5] else g) for g, h in zip(grads, self.hyper)]
        stateful = [i for i, g in enumerate(grads) if g is not None and self.state[i] is not None]
        relearn = self.histogram is not None  # provisional before this step
        fresh = [i for i, g in enumerate(grads) if g is not None and self.state[i] is None]
        if self.robust:  # an all-zero first gradient teaches nothing: weight decay only
            for i in [i for i in fresh if not grads[i].any()]:
                lr, wd = self.hyper[i][0], self.hyper[i][4]
                x = self.params[i].double() * (1 - lr * wd)
                self.params[i] = x.to(self.params[i].dtype)
                fresh.remove(i)
        periods = {i: self.period(grads[i]) for i in fresh}
        blocks = {i: self.block(grads[i].numel(), periods[i]) for i in fresh}
        if fresh and (self.codebook is None or self.histogram is not None):
            rows = blocks if self.robust else periods
            counts = sum(ref_histogram(grads[i], rows[i]) for i in fresh)
            self.learn(counts if self.histogram is None else counts + self.histogram)
        # Robust: while the codebook is provisional, each step learns it again from the
        # gradients of the parameters that had state (a step with a non-finite one teaches
        # nothing), after new parameters learned from theirs.
        if (relearn and self.histogram is not None and stateful
                and all(bool(torch.isfinite(grads[i]).all()) for i in stateful)):
            self.learn(sum((ref_histogram(grads[i], self.state[i]["block"]) for i in stateful),
                           self.histogram))
        for i in fresh:
            n, P, B = grads[i].numel(), periods[i], blocks[i]
            self.state[i] = {
                "period": P,
                "block": B,
                "dtype": grads[i].dtype,
                "codes": np.zeros(n, dtype=np.int64),
                "magnitude": np.zeros(math.ceil(n / B)),
                "vmean": np.zeros(n // P if P > 1 else n),
                "step": 0,
            }
        for i, g in enumerate(grads):
            if g is not None and self.codebook is not None and self.state[i] is not None:
                self._update(i, g)

    def learn(self, counts: np.ndarray) -> None:
        """The codebook of ``counts``; with only empty gradients, nothing to learn from, so the
        codebook waits (the spec is silent; the project's choice) and nothing is updated
        before it exists. Robust: a codebook learned from too few points for K distinct
        entries is provisional; when it is learned again, stored codes move to the new entry
        nearest their old one."""
        if not counts.any():
            return
        codebook = self.learn_codebook(counts)
        for s in self.state:
            if s is not None and self.codebook is not None:
                s["codes"] = ref_nearest(self.codebook[s["codes"]], codebook)
        self.codebook = codebook
        thin = len(points(counts)[0]) < K - 1
        self.histogram = counts if self.robust and thin else None

    def period(self, grad: torch.Tensor) -> int:
        """The inferred period; robust: cut to one row where it spans several rows of more
        than 8 elements (a row: numel / shape[0]; of a 3-D tensor, the last dimension where it
        has more than 8 elements)."""
        period = ref_period(grad)
        if self.robust and grad.dim() >= 2 and grad.shape[0] > 0:
            last = grad.shape[-1]
            row = last if grad.dim() == 3 and last > 8 else grad.numel() // grad.shape[0]
            if row > 8 and period > row:
                return row
        return period

    def block(self, n: int, period: int) -> int:
        """Elements per magnitude: the period; for period 1, Q (published) or 256 with a
        shorter last block (robust)."""
        if period > 1:
            return period
        if self.robust:
            return max(1, min(n, 256))
        return max(d for d in range(1, 257) if n % d == 0)

    def learn_codebook(self, counts: np.ndarray) -> np.ndarray:
        """The codebook of the first step's histogram (a subclass may accept another optimum)."""
        return ref_codebook(counts, zero=self.robust)

    def _update(self, i, grad):
        s, p = self.state[i], self.params[i]
        lr, b1, b2, eps, wd, _ = self.hyper[i]
        dt, P, B = s["dtype"], s["period"], s["block"]
        g = grad.reshape(-1).double().numpy()
        ct = np.float64 if dt == torch.float64 else np.float32  # fp64 state: fp64 math
        sq = g * g
        block_sq = sq if P == 1 else np.array([sq[j:j + P].mean() for j in range(0, g.size, P)])
        if dt == torch.float64:
            s["vmean"] = _round(b2 * s["vmean"] + (1 - b2) * block_sq, dt)
        else:  # the spec's fp32 math, rounded once into the state dtype (a block's mean of g^2
            # in float64: the order of its sum is open, so it may differ in the last fp32 bit)
            v32 = np.float32(b2) * s["vmean"].astype(np.float32)
            s["vmean"] = _round(v32 + block_sq.astype(np.float32) * np.float32(1 - b2), dt)
        s["step"] += 1
        cb = self.codebook
        codes = np.empty_like(s["codes"])
        m_q = np.empty(g.size)
        mags = np.empty_like(s["magnitude"])
        for blk in range(math.ceil(g.size / B)):
            sl = slice(blk * B, (blk + 1) * B)
            m = cb[s["codes"][sl]].astype(ct) * ct(s["magnitude"][blk])
            m = m * ct(b1) + g[sl].astype(ct) * ct(1 - b1)
            mag = _round(np.abs(m).max(), dt)
            mags[blk] = mag
            if mag == 0:
                codes[sl] = 0
            else:
                codes[sl] = ref_nearest(m / ct(mag), cb)
            m_q[sl] = cb[codes[sl]].astype(np.float64) * mag
        s["codes"], s["magnitude"] = codes, mags
        t = s["step"]
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        v = s["vmean"] if P == 1 else np.repeat(s["vmean"], P)
        x = p.reshape(-1).double().numpy() * (1 - lr * wd)
        x = x - lr * m_q / bc1 / (np.sqrt(v / bc2) + eps)
        self.params[i] = torch.from_numpy(x).to(p.dtype).view_as(p)


def ref_codebook(counts: np.ndarray, zero: bool = False) -> np.ndarray:
    """float32 codebook: padded centres (robust: one padded copy turned into 0.0), or the slow
    DP's centres."""
    x, w = points(counts)
    n = len(x)
    if n < K - zero:
        c = np.concatenate([x, np.full(K - n, x[-1])])
        c[0], c[-1] = -1.0, 1.0
        if zero:
            c[n] = 0.0
        return np.sort(c).astype(np.float32)
    return (slow_dp_zero if zero else slow_dp)(counts, K)[0].astype(np.float32)


def codebook_cost(counts: np.ndarray, codebook: np.ndarray) -> float:
    """The k-means objective of ``codebook`` on the histogram's points: sum of w (x - nearest
    entry)^2. For a codebook of the DP (ends pinned, the other entries cluster means) it equals
    the partition's cost when the partition is optimal, so two codebooks that both reach the
    slow DP's optimum cost are equally good (the spec lets ties break either way)."""
    x, w = points(counts)
    d = np.abs(x[:, None] - codebook.astype(np.float64)[None, :]).min(axis=1)
    return float((w * d * d).sum())


class RefGefenMuon(RefGefen):
    """GefenMuon (gefen_compile/muon.py's docstring) for 2-D parameters in one group: Gefen's
    first-step learning and quantised first moment as the momentum, then Muon's update. The
    orthogonalisation is ``orthogonalise(u, ns_coefficients, ns_steps, eps)`` (torch.optim.Muon's
    own function, passed in by the tests)."""

    def __init__(self, params, orthogonalise, lr=1e-3, weight_decay=0.1, momentum=0.95,
                 nesterov=True, adjust_lr_fn=None, variant="robust",
                 ns=((3.4445, -4.7750, 2.0315), 5, 1e-7)):
        super().__init__(params, lr, (momentum, 0.0), 0.0, weight_decay, variant=variant)
        self.orthogonalise, self.ns = orthogonalise, ns
        self.nesterov, self.adjust_lr_fn = nesterov, adjust_lr_fn

    def _update(self, i, grad):
        s, p = self.state[i], self.params[i]
        lr, mu, _, _, wd, _ = self.hyper[i]
        dt, B = s["dtype"], s["block"]
        ct = np.float64 if dt == torch.float64 else np.float32
        g = grad.reshape(-1).double().numpy().astype(ct)
        cb = self.codebook
        u = np.empty(g.size, dtype=ct)
        for blk in range(math.ceil(g.size / B)):
            sl = slice(blk * B, (blk + 1) * B)
            m = cb[s["codes"][sl]].astype(ct) * ct(s["magnitude"][blk])
            m = m * ct(mu) + g[sl] * ct(1 - mu)
            mag = _round(np.abs(m).max(), dt)
            s["magnitude"][blk] = mag
            s["codes"][sl] = 0 if mag == 0 else ref_nearest(m / ct(mag), cb)
            m_q = cb[s["codes"][sl]].astype(ct) * ct(mag)
            u[sl] = m_q * ct(mu) + g[sl] * ct(1 - mu) if self.nesterov else m_q
        update = torch.from_numpy(u).to(torch.bfloat16).view(p.shape)
        rows, cols = p.shape
        ratio = (0.2 * math.sqrt(max(rows, cols)) if self.adjust_lr_fn == "match_rms_adamw"
                 else math.sqrt(max(1, rows / cols)))
        ortho = self.orthogonalise(update, *self.ns).double()
        # As torch.optim.Muon stores them: the decay, then the update, each rounded into the
        # parameter's dtype.
        decayed = _round(p.double().numpy() * (1 - lr * wd), p.dtype)
        x = decayed - lr * ratio * ortho.numpy()
        self.params[i] = torch.from_numpy(x).to(p.dtype)
