"""What Gefen and GefenMuon share: a first moment (Gefen's) or momentum (GefenMuon's) stored as
uint8 codes into one 256-entry codebook times a magnitude per block, with the codebook and every
parameter's period learned from first gradients (GEFEN_SPEC "Period inference", "Codebook",
and the robust variant's rules in variant.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import distributed
from .codebook import NearestCode
from .first_step import codebook_from, read_first_gradients


class LearnedState:
    """Mixin of a ``torch.optim.Optimizer`` with ``variant``, ``codebook`` and ``_nearest``."""

    _name = "Gefen"  # in error messages

    def _set_codebook(self, codebook: Tensor | None) -> None:
        self.codebook = codebook
        self._nearest = None if codebook is None else NearestCode(codebook)

    def _params(self) -> list[Tensor]:
        """Every parameter, in state_dict index order."""
        return [p for group in self.param_groups for p in group["params"]]

    def _locate(self, p: Tensor) -> str:
        """'parameter i of param group j' (its name, when known), for error messages."""
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    name = f" ({group['param_names'][pi]})" if "param_names" in group else ""
                    return f"parameter {pi} of param group {gi}{name}"
        raise KeyError("parameter not in this optimizer")

    def _learn(self, fresh: list[tuple[dict, Tensor, Tensor]]) -> list[tuple[dict, Tensor, Tensor]]:
        """Periods (and, at the first step, the codebook) of parameters seen for the first
        time, from their first gradients (``fresh``: group, parameter, local gradient): each
        learning parameter's state becomes ``{"period": period}``, and those are returned.
        Robust variant: those whose gradient is all zero (on every rank) get AdamW's weight
        decay only (as Muon's update of a zero gradient is), and wait."""
        grads = [g for _, _, g in fresh]
        periods, finite, nonzero = read_first_gradients(grads, self.variant)
        for (_, p, _), ok in zip(fresh, finite):
            if not ok:
                raise ValueError(
                    f"{self._name}: the first gradient of {self._locate(p)} has inf or nan "
                    f"values; {self._name} reads periods and its codebook from first gradients, "
                    "so skip this step (as torch.amp.GradScaler does) and call step() again "
                    "with finite gradients"
                )
        if self.variant.zero_gradients_wait:
            nonzero = distributed.nonzero_anywhere([p for _, p, _ in fresh], nonzero)
            decay_only([f for f, learn in zip(fresh, nonzero) if not learn])
            fresh = [f for f, learn in zip(fresh, nonzero) if learn]
            periods = [period for period, learn in zip(periods, nonzero) if learn]
            if not fresh:
                return []
        if self.codebook is None:
            negate = [group.get("maximize", False) for group, _, _ in fresh]
            self._set_codebook(codebook_from([p for _, p, _ in fresh], [g for _, _, g in fresh],
                                             periods, negate, self.variant))
        for (_, p, _), period in zip(fresh, periods):
            self.state[p] = {"period": period}
        return fresh


def decay_only(waiting: list[tuple[dict, Tensor, Tensor]]) -> None:
    """The step of a zero gradient, for parameters whose state waits for a non-zero one:
    decoupled weight decay only (p *= 1 - lr * weight_decay)."""
    for group, p, _ in waiting:
        if group["weight_decay"]:
            distributed.local(p).mul_(1 - group["lr"] * group["weight_decay"])
