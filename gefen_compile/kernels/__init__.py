"""Implementations of one Gefen step, all taking the arguments of ``ops.step_``."""

from __future__ import annotations

from typing import NamedTuple

import torch


class StepInputs(NamedTuple):
    """The arguments of ``gefen::step_`` (see ``ops.step_``), in order."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    codes: torch.Tensor
    magnitude: torch.Tensor
    vmean: torch.Tensor
    steps: torch.Tensor
    segments: torch.Tensor
    num_rows: int
    param_group: torch.Tensor
    hyper: torch.Tensor
    codebook: torch.Tensor
    lut: torch.Tensor
    bounds: torch.Tensor
    first_index: torch.Tensor
    lut_half: int
    work: list[torch.Tensor]
    work_classes: list[int]
