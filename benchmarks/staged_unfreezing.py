"""Training that starts with a few parameters alone (staged unfreezing, a learnable scale or
temperature trained first): the codebook the first step learns from them, kept or learned
again once the rest trains (the robust variant's thin-codebook rule, gefen_compile/variant.py).

    python benchmarks/staged_unfreezing.py [--steps 300] [--seeds 3] [--threads 1]

An MLP (32 -> 128 -> 128 -> 8, GELU; 22K parameters) times a learnable one-element output
scale, full-batch regression on tanh targets, lr 3e-3, no weight decay. For the first 5 steps
only some parameters have gradients: all of them, the last layer's 8-element bias, or the
scale; then all. Final losses (median over seeds) of AdamW, Gefen (robust default), Gefen with
the thin-codebook rule switched off (the robust variant as it was before the rule: its first
codebook kept whatever it was learned from) and Gefen published, with the number of distinct
codebook entries at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch
from torch import nn

from gefen_compile import Gefen

WARM = 5
# Labelled as in README.md's table.
FIRST = {"everything": None, "the last bias (8 elements)": "bias", "the scale (1 element)": "scale"}


def without_relearning(params, **kwargs) -> Gefen:
    optimizer = Gefen(params, **kwargs)
    optimizer.variant = dataclasses.replace(optimizer.variant, relearns_thin_codebook=False)
    return optimizer


OPTIMIZERS = {
    "AdamW": lambda params, **kw: torch.optim.AdamW(params, **kw),
    "Gefen (robust)": lambda params, **kw: Gefen(params, **kw),
    "robust, thin-codebook rule off": without_relearning,
    "published": lambda params, **kw: Gefen(params, variant="published", **kw),
}


def final_loss(make, first: str | None, steps: int, seed: int) -> tuple[float, int | None]:
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(512, 32, generator=gen), torch.randn(32, 8, generator=gen)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(512, 8, generator=gen)
    torch.manual_seed(seed + 1)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                          nn.Linear(128, 8))
    scale = nn.Parameter(torch.ones(1))
    optimizer = make(list(model.parameters()) + [scale], lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        warm = step < WARM and first is not None
        model.requires_grad_(not warm)
        scale.requires_grad_(not warm or first == "scale")
        if warm and first == "bias":
            model[4].bias.requires_grad_(True)
        optimizer.zero_grad()
        ((model(x) * scale - y) ** 2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        loss = ((model(x) * scale - y) ** 2).mean().item()
    codebook = getattr(optimizer, "codebook", None)
    return loss, None if codebook is None else len(codebook.unique())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"final loss, median of {args.seeds} seeds ({args.steps} steps; distinct codebook "
          "entries at the end)")
    print("| first 5 steps train | " + " | ".join(OPTIMIZERS) + " |")
    print("|---" * (len(OPTIMIZERS) + 1) + "|")
    for label, first in FIRST.items():
        cells = []
        for make in OPTIMIZERS.values():
            runs = [final_loss(make, first, args.steps, seed) for seed in range(args.seeds)]
            loss = statistics.median(r[0] for r in runs)
            entries = {r[1] for r in runs if r[1] is not None}
            cells.append(f"{loss:.2e}" + (f" ({'/'.join(map(str, sorted(entries)))})"
                                          if entries else ""))
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
