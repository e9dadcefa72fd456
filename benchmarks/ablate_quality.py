"""Which part of Gefen costs validation loss on examples/train_gpt.py: an ablation.

    python benchmarks/ablate_quality.py MODE [--steps N] [--lr LR] [--seed S]
                                        [--period NAME=P ...] [--zero-entry]

MODE: ``adamw`` and ``gefen`` (the real optimizers), or a plain-torch AdamW with one of Gefen's
two ideas at a time, on the periods and codebook Gefen infers at the first step (learned on a
copy of the model, from the same first batch):

- ``shared_v``: one second moment per block of the tensor's period (per element for P = 1);
  the first moment in fp32.
- ``quantised_m``: per-element second moment; the first moment quantised to the codebook with
  one magnitude per block, as Gefen stores it.
- ``both``: the two together (Gefen's update, in slow plain torch).

``--period NAME=P`` replaces the inferred period of one parameter (``tok_emb.weight=1``, say);
``--zero-entry`` replaces the codebook entry nearest 0 by 0. Everything else is train_gpt.py's
default run (model, data, batch, schedule, clipping, weight decay). Prints one JSON line: the
final validation loss and the periodic ones. Results: benchmarks/results/quality_ablation.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import train_gpt as T  # noqa: E402

import gefen_compile  # noqa: E402
from gefen_compile.variant import PUBLISHED  # noqa: E402

MODES = ("adamw", "gefen", "shared_v", "quantised_m", "both")


def first_step_metadata(model, batch) -> tuple[dict[str, int], torch.Tensor]:
    """The periods (by parameter name) and codebook Gefen learns at the first step."""
    model = copy.deepcopy(model)
    optimizer = gefen_compile.Gefen(model.parameters(), betas=T.BETAS,
                                    weight_decay=T.WEIGHT_DECAY)
    T.lm_loss(model, *batch).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), T.GRAD_CLIP)
    optimizer.step()
    periods = {n: optimizer.state[p]["period"] for n, p in model.named_parameters()}
    return periods, optimizer.codebook.clone()


class AblatedAdamW(torch.optim.Optimizer):
    """AdamW, with per tensor: a block second moment (``shared`` = period, or None) and/or a
    codebook-quantised first moment (``quantise``, blocks of ``block`` for the magnitude)."""

    def __init__(self, params, options: list[dict], codebook: torch.Tensor, lr: float) -> None:
        super().__init__(params, dict(lr=lr, betas=T.BETAS, eps=1e-8,
                                      weight_decay=T.WEIGHT_DECAY))
        self.options = dict(zip(self.param_groups[0]["params"], options))
        self.codebook = codebook.float()
        self.midpoints = (self.codebook[1:] + self.codebook[:-1]) / 2

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            o, state, g = self.options[p], self.state[p], p.grad.reshape(-1).float()
            if not state:
                state.update(step=0, m=torch.zeros_like(g),
                             v=torch.zeros(g.numel() // (o["shared"] or 1)))
            state["step"] += 1
            square = g * g
            if o["shared"]:
                square = square.view(-1, o["shared"]).mean(1)
            state["v"].mul_(beta2).add_(square, alpha=1 - beta2)
            m = state["m"] * beta1 + g * (1 - beta1)
            if o["quantise"]:
                blocks = m.view(-1, o["block"])
                peak = blocks.abs().amax(1, keepdim=True)
                ratio = torch.where(peak > 0, blocks / peak, torch.zeros_like(blocks))
                m = (self.codebook[torch.bucketize(ratio, self.midpoints)] * peak).view(-1)
            state["m"] = m
            v = state["v"].repeat_interleave(o["shared"]) if o["shared"] else state["v"]
            t = state["step"]
            update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
            p.mul_(1 - lr * group["weight_decay"]).add_(update.view_as(p), alpha=-lr)


def build_optimizer(mode, model, periods, codebook, lr):
    if mode == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=T.BETAS,
                                 weight_decay=T.WEIGHT_DECAY)
    if mode == "gefen":
        return gefen_compile.Gefen(model.parameters(), lr=lr, betas=T.BETAS,
                                   weight_decay=T.WEIGHT_DECAY)
    options = []
    for name, p in model.named_parameters():
        period = periods[name]
        options.append(dict(shared=period if mode != "quantised_m" and period > 1 else None,
                            quantise=mode != "shared_v",
                            block=PUBLISHED.magnitude_block(p.numel(), period)))
    return AblatedAdamW(model.parameters(), options, codebook, lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--steps", type=int, default=T.TrainConfig.steps)
    parser.add_argument("--lr", type=float, default=T.TrainConfig.lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--period", action="append", default=[], metavar="NAME=P")
    parser.add_argument("--zero-entry", action="store_true")
    args = parser.parse_args()
    config = T.TrainConfig(steps=args.steps, seed=args.seed, lr=args.lr)
    train_data, val_data = T.load_corpus()
    val_batches = T.validation_batches(val_data, config)
    model = T.build_model(config)
    first = T.sample_batch(train_data, config.batch_size, config.block_size,
                           torch.Generator().manual_seed(args.seed))
    periods, codebook = first_step_metadata(model, first)
    for item in args.period:
        name, _, value = item.partition("=")
        if name not in periods:
            raise SystemExit(f"--period {item}: no parameter {name!r}; one of {sorted(periods)}")
        periods[name] = int(value)
    if args.zero_entry:
        codebook[codebook.abs().argmin()] = 0.0
        codebook = codebook.sort().values
    optimizer = build_optimizer(args.mode, model, periods, codebook, args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, T.lr_schedule(args.steps))
    generator = torch.Generator().manual_seed(args.seed)
    curve = []
    for step in range(1, args.steps + 1):
        batch = T.sample_batch(train_data, config.batch_size, config.block_size, generator)
        T.train_step(model, optimizer, schedule, *batch)
        if step == args.steps or step % max(1, args.steps // 10) == 0:
            batches = val_batches if step == args.steps else val_batches[:4]
            curve.append((step, T.evaluate(model, batches, "cpu")))
    print(json.dumps(dict(mode=args.mode, steps=args.steps, lr=args.lr, seed=args.seed,
                          period=args.period, zero_entry=args.zero_entry,
                          final_val=curve[-1][1], curve=curve)))


if __name__ == "__main__":
    main()
