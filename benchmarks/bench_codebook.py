"""First-step costs: exact DP codebook and period inference.

    python3 benchmarks/bench_codebook.py

Prints the median time of ``learn_codebook`` on a histogram with all 4096 bins non-empty (the
largest problem the DP ever sees: B = 4096 points, K = 256 clusters), for each variant (the
robust one pins 0 too: two DPs, from each end), and of ``infer_period`` on gradients of a few
sizes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from gefen_compile.codebook import NUM_BINS, learn_codebook
from gefen_compile.first_step import infer_period
from gefen_compile.variant import PUBLISHED, ROBUST


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help
    counts = torch.from_numpy(np.random.default_rng(0).integers(1, 10_000, NUM_BINS))
    for variant in (ROBUST, PUBLISHED):
        seconds = median_seconds(lambda: learn_codebook(counts, variant), 5)
        print(f"learn_codebook ({variant.name}), {NUM_BINS} non-empty bins, K=256: "
              f"{seconds * 1e3:.0f} ms (median of 5)")
    gen = torch.Generator().manual_seed(0)
    for rows, cols in [(768, 768), (3072, 768), (50257, 768)]:
        grad = torch.exp(torch.randn(rows, 1, generator=gen)) * torch.randn(rows, cols, generator=gen)
        seconds = median_seconds(lambda: infer_period(grad, ROBUST), 3)
        print(f"infer_period {rows}x{cols} ({rows * cols / 1e6:.1f}M elements): "
              f"{seconds * 1e3:.0f} ms (median of 3), period {infer_period(grad, ROBUST)}")


if __name__ == "__main__":
    main()
