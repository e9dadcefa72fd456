"""Gefen checkpoints against AdamW's: a Gefen ``state_dict`` that a plain ``torch.optim.AdamW``
refuses at load time, and :func:`adamw_state_dict`, the way back to AdamW.

``torch.optim.Adam(W).load_state_dict`` checks only the number of groups and parameters, then
its ``__setstate__`` reads ``float(entry["step"])`` for every entry whose step is not a tensor.
So Gefen saves each entry's step counter under ``"gefen_step"`` and, under ``"step"``, the bytes
:data:`MARKER` (bytes survive ``torch.save``/``torch.load(weights_only=True)``, DCP and the
optimizer's own copying, where a str would not): a plain AdamW then fails at load with
``ValueError: could not convert string to float: b"...<MARKER>"``, which names the fix, instead
of a ``KeyError: 'exp_avg'`` at its first step. Gefen's ``codes`` are saved in the parameter's
shape, so that a state_dict alone is enough to rebuild AdamW's moments.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .distributed import is_sharded
from .kernels.torch_step import as_blocks
from .state import compute_dtype
from .variant import Variant, saved_variant

MARKER = (
    b"this is gefen_compile.Gefen optimizer state, which torch.optim.AdamW cannot load: load it "
    b"into gefen_compile.Gefen (or run under python -m gefen_compile, or after "
    b"gefen_compile.patch_adamw()), or convert it for AdamW first: "
    b"adamw.load_state_dict(gefen_compile.adamw_state_dict(state_dict))"
)
STEP = "gefen_step"
# torch.optim.Muon starts a missing momentum buffer from zero: GefenMuon saves these bytes
# under "momentum_buffer" instead, so that Muon fails at its first step (AttributeError:
# 'bytes' object has no attribute ...), the marker's text in its state, not silently.
MUON_MARKER = (
    b"this is gefen_compile.GefenMuon optimizer state, which torch.optim.Muon cannot step with "
    b"(its momentum would start again from zero): load it into gefen_compile.GefenMuon (or run "
    b"under python -m gefen_compile, or after gefen_compile.patch_muon())"
)
BUFFER = "momentum_buffer"


def for_saving(params: list[Tensor], state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (entries keyed by index into ``params``) as Gefen saves it: the step
    counter under ``"gefen_step"``, the :data:`MARKER` under ``"step"``, plain ``codes`` in the
    parameter's shape (views: nothing is copied). An empty entry (reading ``optimizer.state[p]``
    creates one for a parameter without state) is saved empty, as torch saves it."""
    state = {}
    for key, entry in state_dict["state"].items():
        if not entry:
            state[key] = {}  # a plain dict: the live entry is a state-tracking subclass
            continue
        entry = {**entry, "step": MARKER, STEP: entry["step"]}
        if not is_sharded(entry["codes"]):
            entry["codes"] = entry["codes"].view(params[key].shape)
        state[key] = entry
    return {**state_dict, "state": state}


def muon_for_saving(state_dict: dict[str, Any]) -> dict[str, Any]:
    """GefenMuon's ``state_dict`` as saved: the :data:`MUON_MARKER` in each entry."""
    return {**state_dict, "state": {k: {**e, BUFFER: MUON_MARKER} if e else {}
                                    for k, e in state_dict["state"].items()}}


def muon_from_saved(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`muon_for_saving` (Muon's own momentum buffers pass unchanged)."""
    return {**state_dict, "state": {
        k: {key: v for key, v in e.items() if not (key == BUFFER and isinstance(v, bytes))}
        for k, e in state_dict["state"].items()}}


def from_saved(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`for_saving` (entries saved without the marker pass unchanged)."""
    return {**state_dict, "state": {k: _restored(e) for k, e in state_dict["state"].items()}}


def _restored(entry: dict[str, Any]) -> dict[str, Any]:
    entry = dict(entry)
    # A partial entry that dcp.load restored beside the real one may hold only the marker.
    if isinstance(entry.get("step"), bytes):
        del entry["step"]
    if STEP in entry:
        entry["step"] = entry.pop(STEP)
    return entry


def adamw_state_dict(optimizer_or_state_dict: Optimizer | dict[str, Any]) -> dict[str, Any]:
    """An AdamW ``state_dict`` from Gefen's (a Gefen optimizer, or its ``state_dict()``), for
    going back to ``torch.optim.AdamW``: ``adamw.load_state_dict(adamw_state_dict(gefen))``.

    Per parameter: ``exp_avg``, the dequantised first moment (``codebook[codes]`` times the
    block's magnitude), ``exp_avg_sq``, each block's second moment repeated over its elements,
    both in the parameter's shape and the state's dtype, and ``step`` (float32, on CPU, as
    AdamW keeps it). Param groups are kept as saved. The state of sharded (DTensor) parameters
    is not supported.
    """
    state_dict = optimizer_or_state_dict
    if isinstance(state_dict, Optimizer):
        state_dict = state_dict.state_dict()
    if not (isinstance(state_dict, dict) and "state" in state_dict and "param_groups" in state_dict):
        raise TypeError(
            "adamw_state_dict: expected a Gefen optimizer or its state_dict(), got "
            f"{type(optimizer_or_state_dict).__name__}"
        )
    if any("ns_steps" in group for group in state_dict["param_groups"]):  # Muon's own key
        raise TypeError(
            "adamw_state_dict: this is GefenMuon (or Muon) state, a momentum per parameter, not "
            "AdamW's two moments; resume it with gefen_compile.GefenMuon"
        )
    state_dict = from_saved(state_dict)
    codebook = state_dict.get("codebook")
    variant = saved_variant(state_dict)
    state = {}
    for key, entry in state_dict["state"].items():
        if "per_rank" in entry:
            raise NotImplementedError(
                f"adamw_state_dict: parameter {key} is sharded (a DTensor); converting sharded "
                "Gefen state to AdamW is not supported: resume with gefen_compile.Gefen"
            )
        if "codes" not in entry:  # AdamW's own entry, say
            state[key] = entry
            continue
        if codebook is None:
            raise ValueError(
                "adamw_state_dict: this state_dict has Gefen entries but no 'codebook'; pass "
                "the optimizer's own state_dict() (torch's state_dict helpers drop it)"
            )
        state[key] = _adamw_entry(entry, codebook, variant)
    return {"state": state, "param_groups": deepcopy(state_dict["param_groups"])}


def _adamw_entry(entry: dict[str, Any], codebook: Tensor, variant: Variant) -> dict[str, Any]:
    codes, magnitude, vmean, period = (entry[k] for k in ("codes", "magnitude", "vmean", "period"))
    math = compute_dtype(vmean.dtype)
    block = variant.magnitude_block(codes.numel(), period)
    values = as_blocks(codebook.to(codes.device, math)[codes.reshape(-1).long()], block)
    exp_avg = (values * magnitude.to(math).unsqueeze(1)).view(-1)[: codes.numel()]
    exp_avg_sq = vmean.repeat_interleave(period) if period > 1 else vmean.clone()
    return {
        "step": entry["step"].detach().to("cpu", torch.float32).clone(),
        "exp_avg": exp_avg.to(vmean.dtype).view(codes.shape),
        "exp_avg_sq": exp_avg_sq.view(codes.shape),
    }
