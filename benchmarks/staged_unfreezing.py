"""Training that starts with a few parameters alone (staged unfreezing, a learnable scale or
temperature trained first), and tiny models: the codebook the first step learns from too few
values, kept, or learned again as the rest trains and at each step while it is thin (the
robust variant's thin-codebook rule, gefen_compile/variant.py).

    python benchmarks/staged_unfreezing.py [--steps 300] [--seeds 3] [--threads 1]

An MLP (32 -> 128 -> 128 -> 8, GELU; 22K parameters) times a learnable one-element output
scale, full-batch regression on tanh targets, lr 3e-3, no weight decay. For the first 5 steps
only some parameters have gradients: all of them, the last layer's 8-element bias, or the
scale; then all. Final losses (median over seeds) of AdamW, Gefen (robust default), Gefen with
the thin-codebook rule switched off (the robust variant as it was before the rule: its first
codebook kept whatever it was learned from), Gefen robust relearning only as parameters get
state (the rule before it also relearned at each step) and Gefen published, with the number of
distinct codebook entries at the end. Then the same for two tiny models where every parameter
trains from the first step, lr 5e-2: fitting a 5-element vector to -(1, 2, 3, 4, 5) from zeros
(squared error), and logistic regression, nn.Linear(4, 3) on 256 Gaussian points labelled by
a random linear map (cross-entropy).
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


def relearning_as_parameters_join(params, **kwargs) -> Gefen:
    optimizer = Gefen(params, **kwargs)
    optimizer._relearn_provisional = lambda stepping: None
    return optimizer


OPTIMIZERS = {
    "AdamW": lambda params, **kw: torch.optim.AdamW(params, **kw),
    "Gefen (robust)": lambda params, **kw: Gefen(params, **kw),
    "robust, thin-codebook rule off": without_relearning,
    "robust, relearned only as parameters join": relearning_as_parameters_join,
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


def tiny_loss(make, workload: str, steps: int, seed: int) -> tuple[float, int | None]:
    gen = torch.Generator().manual_seed(seed)
    if workload == "vector":
        target = -torch.arange(1.0, 6.0)
        model = nn.Module()
        model.weight = nn.Parameter(torch.zeros(5))

        def loss():
            return ((model.weight - target) ** 2).sum()
    else:
        x = torch.randn(256, 4, generator=gen)
        labels = (x @ torch.randn(4, 3, generator=gen)).argmax(1)
        torch.manual_seed(seed)
        model = nn.Linear(4, 3)

        def loss():
            return nn.functional.cross_entropy(model(x), labels)
    params = list(model.parameters())
    optimizer = make(params, lr=5e-2, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        final = loss().item()
    codebook = getattr(optimizer, "codebook", None)
    return final, None if codebook is None else len(codebook.unique())


TINY = {"a 5-element vector": "vector", "logistic regression (15 parameters)": "logistic"}


def table(label: str, rows: dict, run, args) -> None:
    print(f"| {label} | " + " | ".join(OPTIMIZERS) + " |")
    print("|---" * (len(OPTIMIZERS) + 1) + "|")
    for name, key in rows.items():
        cells = []
        for make in OPTIMIZERS.values():
            runs = [run(make, key, args.steps, seed) for seed in range(args.seeds)]
            loss = statistics.median(r[0] for r in runs)
            entries = {r[1] for r in runs if r[1] is not None}
            cells.append(f"{loss:.2e}" + (f" ({'/'.join(map(str, sorted(entries)))})"
                                          if entries else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"final loss, median of {args.seeds} seeds ({args.steps} steps; distinct codebook "
          "entries at the end)")
    table("first 5 steps train", FIRST, final_loss, args)
    print()
    table("tiny model", TINY, tiny_loss, args)


if __name__ == "__main__":
    main()
