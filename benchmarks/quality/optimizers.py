"""The three optimizers every workload runs, built from the same hyperparameters.

Kept in one place so that a workload cannot give one contestant different settings than the
others: each workload asks :func:`build` for a name and passes AdamW's usual arguments.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = ("adamw", "gefen-robust", "gefen-published")
# AdamW keeps two fp32 tensors (exp_avg, exp_avg_sq) per parameter.
ADAMW_BYTES_PER_PARAM = 8.0


def build(name: str, params: Iterable[torch.nn.Parameter],
          **hyperparameters: object) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` or ``gefen_compile.Gefen`` of one variant, with the same
    ``hyperparameters`` (lr, betas, weight_decay, ...)."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, **hyperparameters)
    if name.startswith("gefen-"):
        import gefen_compile  # imported here: AdamW-only runs work even while Gefen does not

        variant = name.removeprefix("gefen-")
        return gefen_compile.Gefen(params, **hyperparameters, variant=variant)
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Optimizer-state bytes per parameter: Gefen's own ``memory_report`` (after the first step,
    when its state exists), AdamW's fixed 8."""
    if type(optimizer) is torch.optim.AdamW:
        return ADAMW_BYTES_PER_PARAM
    import gefen_compile

    return gefen_compile.memory_report(optimizer).gefen_bytes_per_param
