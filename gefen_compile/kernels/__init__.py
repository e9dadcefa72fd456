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
    skip: torch.Tensor | None = None


def is_readable(t: torch.Tensor) -> bool:
    """Whether the kernels can read (and write) ``t`` in place, as an array of its dtype's
    values: contiguous, without torch's negation bit (a ``torch._neg_view``'s memory holds -t),
    and aligned to its element size (``torch.frombuffer`` at an odd byte offset is not)."""
    return t.is_contiguous() and not t.is_neg() and t.data_ptr() % t.element_size() == 0


def readable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of its values that the kernels can read (:func:`is_readable`). Traced
    by dynamo, only made contiguous: it cannot trace is_neg() or data_ptr()."""
    if torch.compiler.is_compiling():
        return t.contiguous()
    return t if is_readable(t) else t.clone(memory_format=torch.contiguous_format)
