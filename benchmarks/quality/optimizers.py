"""The contestants every workload runs, built from the same hyperparameters.

Kept in one place so that a workload cannot give one contestant different settings than the
others: each workload asks :func:`build` (or :func:`build_for_model`) for a name and passes
AdamW's usual arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

# What most workloads compare (to adamw), and what the Muon workload compares (to muon).
GEFEN_CONTEST = ("adamw", "gefen-robust", "gefen-published")
MUON_CONTEST = ("adamw", "muon", "gefen-muon")
OPTIMIZERS = GEFEN_CONTEST + MUON_CONTEST[1:]
# AdamW keeps two fp32 tensors (exp_avg, exp_avg_sq) per parameter; Muon one (momentum_buffer).
ADAMW_BYTES_PER_PARAM = 8.0
MUON_BYTES_PER_PARAM = 4.0
# Muon's momentum (torch.optim.Muon's default); "match_rms_adamw" scales each matrix's update
# to AdamW's RMS (Moonshot's recipe), so AdamW's lr and weight decay carry over unchanged.
MUON_MOMENTUM = 0.95
MUON_ADJUST_LR = "match_rms_adamw"


def build(name: str, params: Iterable[torch.nn.Parameter],
          **hyperparameters: object) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` or ``gefen_compile.Gefen`` of one variant, with the same
    ``hyperparameters`` (lr, betas, weight_decay, ...)."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, **hyperparameters)
    if name.startswith("gefen-") and name != "gefen-muon":
        import gefen_compile  # imported here: AdamW-only runs work even while Gefen does not

        variant = name.removeprefix("gefen-")
        return gefen_compile.Gefen(params, **hyperparameters, variant=variant)
    raise ValueError(f"unknown optimizer {name!r} for all parameters; use one of "
                     f"{', '.join(GEFEN_CONTEST)}")


class Pair:
    """Two optimizers (or their schedulers) behind the ``zero_grad``/``step`` that
    ``train_gpt.train_step`` calls: Muon's matrices first, the rest second."""

    def __init__(self, matrices, rest) -> None:
        self.matrices, self.rest = matrices, rest

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.matrices.zero_grad(set_to_none)
        self.rest.zero_grad(set_to_none)

    def step(self) -> None:
        self.matrices.step()
        self.rest.step()


def hidden_matrices(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The transformer blocks' 2-D weights (attention and MLP: Muon's), and every other
    parameter (embeddings, the tied or untied head, norms, biases: AdamW's, as usual)."""
    matrices, rest = [], []
    for name, p in model.named_parameters():
        (matrices if name.startswith("blocks.") and p.ndim == 2 else rest).append(p)
    return matrices, rest


def build_for_model(name: str, model: nn.Module, *, lr: float, betas: tuple[float, float],
                    weight_decay: float) -> torch.optim.Optimizer | Pair:
    """:func:`build` on all of ``model``'s parameters, or for ``muon`` / ``gefen-muon`` a
    :class:`Pair`: Muon / GefenMuon on :func:`hidden_matrices`, AdamW / Gefen (robust) on the
    rest, with the same lr and weight decay."""
    if name not in MUON_CONTEST[1:]:
        return build(name, model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    matrices, rest = hidden_matrices(model)
    muon = dict(lr=lr, weight_decay=weight_decay, momentum=MUON_MOMENTUM,
                adjust_lr_fn=MUON_ADJUST_LR)
    adamw = dict(lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "muon":
        return Pair(torch.optim.Muon(matrices, **muon), torch.optim.AdamW(rest, **adamw))
    import gefen_compile

    return Pair(gefen_compile.GefenMuon(matrices, **muon), gefen_compile.Gefen(rest, **adamw))


def schedule(optimizer: torch.optim.Optimizer | Pair,
             factor: Callable[[int], float]) -> torch.optim.lr_scheduler.LambdaLR | Pair:
    """``LambdaLR(optimizer, factor)``; for a :class:`Pair`, one per optimizer, stepped
    together, so the same schedule drives both."""
    if isinstance(optimizer, Pair):
        return Pair(schedule(optimizer.matrices, factor), schedule(optimizer.rest, factor))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def state_bytes_per_param(optimizer: torch.optim.Optimizer | Pair) -> float:
    """Optimizer-state bytes per parameter: Gefen's own ``memory_report`` (after the first step,
    when its state exists), AdamW's fixed 8; for a :class:`Pair`, the matrices' momentum only
    (GefenMuon's ``memory_report``, Muon's fixed 4)."""
    if isinstance(optimizer, Pair):
        optimizer = optimizer.matrices
    if type(optimizer) is torch.optim.AdamW:
        return ADAMW_BYTES_PER_PARAM
    if type(optimizer) is torch.optim.Muon:
        return MUON_BYTES_PER_PARAM
    import gefen_compile

    return gefen_compile.memory_report(optimizer).gefen_bytes_per_param
