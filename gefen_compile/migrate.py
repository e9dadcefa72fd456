"""AdamW state -> Gefen state (GEFEN_SPEC "State per parameter"), and Muon's momentum ->
GefenMuon's, for an optimizer converted after it stepped or a checkpoint of the original loaded
into its Gefen counterpart.

Periods are inferred from ``sqrt(exp_avg_sq)``, a smoothed |g| (period inference reads
log g^2); the codebook, unless the optimizer has one, is learned from the normalised
``exp_avg``, exactly as from first gradients; ``exp_avg`` is quantised into codes and block
magnitudes as a step does, and ``exp_avg_sq`` averaged per block into ``vmean``. Muon's
``momentum_buffer`` (a smoothed gradient) gives the periods, the codebook and the codes alike.
"""

from __future__ import annotations

from typing import Any

import torch

from .first_step import infer_period
from .kernels.torch_step import as_blocks, quantise_blocks
from .state import STATE_DTYPES, compute_dtype

_ADAMW_KEYS = ("exp_avg", "exp_avg_sq")


def has_adamw_state(entry: dict[str, Any]) -> bool:
    """Whether one parameter's state entry is AdamW's (Adamax's exp_avg beside exp_inf is not)."""
    return all(k in entry for k in _ADAMW_KEYS)


def check_saved_moments(optimizer, state_dict: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Refuse, before anything is loaded, a checkpoint of the optimizer that ``optimizer``
    replaces whose moments (``keys``) are not tensors of their parameters' shapes: migrated,
    they would make state of another size, which every later step would refuse."""
    saved_groups = state_dict["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups]:
        return  # torch's load_state_dict refuses that, saying so
    params = {}
    for saved, group in zip(saved_groups, optimizer.param_groups):
        params.update(zip(saved["params"], group["params"]))
    for index, entry in state_dict["state"].items():
        p = params.get(index)
        for key in keys:
            moment = entry.get(key)
            if p is None or moment is None or (
                    isinstance(moment, torch.Tensor) and moment.shape == p.shape):
                continue
            found = (f"has shape {tuple(moment.shape)}" if isinstance(moment, torch.Tensor)
                     else f"is a {type(moment).__name__}, not a tensor")
            raise ValueError(
                f"{optimizer._name}.load_state_dict: the saved {key} of {optimizer._locate(p)} "
                f"{found}, the parameter shape {tuple(p.shape)}: the checkpoint is of another "
                "model, or of these parameters in another order"
            )


def migrate_adamw_state(optimizer) -> None:
    """Replace AdamW state entries (``exp_avg``, ``exp_avg_sq``, ``step``) of a Gefen optimizer
    by Gefen state; an entry that never stepped (robust variant: or saw only zero gradients)
    is dropped (Gefen's first step sets it up)."""
    entries = [
        (p, optimizer.state[p])
        for group in optimizer.param_groups
        for p in group["params"]
        if has_adamw_state(optimizer.state.get(p, {}))
    ]
    if not entries:
        return
    steps = torch.stack([torch.as_tensor(s["step"], dtype=torch.float64, device="cpu")
                         for _, s in entries])
    stepped = [(p, s) for (p, s), n in zip(entries, steps.tolist()) if n > 0]
    if optimizer.variant.zero_gradients_wait and stepped:
        # Entries whose gradients were all zero so far teach nothing: set up at a later step.
        seen = torch.stack([s["exp_avg_sq"].detach().count_nonzero().cpu() for _, s in stepped])
        stepped = [e for e, any_gradient in zip(stepped, (seen > 0).tolist()) if any_gradient]
    for p, _ in entries:
        del optimizer.state[p]
    if not stepped:
        return
    periods = [infer_period(s["exp_avg_sq"].sqrt(), optimizer.variant) for _, s in stepped]
    optimizer._learn_codebook([p for p, _ in stepped], [s["exp_avg"] for _, s in stepped],
                              periods, [False] * len(periods))
    for (p, saved), period in zip(stepped, periods):
        optimizer.state[p] = _gefen_entry(optimizer, saved, period)
    optimizer._buckets = None


def migrate_muon_state(optimizer) -> None:
    """Replace Muon's ``momentum_buffer`` entries of a GefenMuon optimizer by GefenMuon state
    (codes, magnitude, period); an all-zero buffer (robust variant: a parameter that saw only
    zero gradients) is dropped, to be set up at a later step."""
    entries = [
        (p, optimizer.state[p])
        for group in optimizer.param_groups
        for p in group["params"]
        if "momentum_buffer" in optimizer.state.get(p, {})
    ]
    for p, _ in entries:
        del optimizer.state[p]
    if optimizer.variant.zero_gradients_wait and entries:
        seen = torch.stack([s["momentum_buffer"].detach().count_nonzero().cpu() for _, s in entries])
        entries = [e for e, any_gradient in zip(entries, (seen > 0).tolist()) if any_gradient]
    if not entries:
        return
    buffers = [s["momentum_buffer"] for _, s in entries]
    periods = [infer_period(b, optimizer.variant) for b in buffers]
    optimizer._learn_codebook([p for p, _ in entries], buffers, periods, [False] * len(periods))
    for (p, _), buffer, period in zip(entries, buffers, periods):
        codes, magnitude = _quantised(optimizer, buffer, period)
        optimizer.state[p] = {"period": period, "codes": codes, "magnitude": magnitude}
    optimizer._buckets = None


def _gefen_entry(optimizer, saved: dict[str, Any], period: int) -> dict[str, Any]:
    """One parameter's Gefen state from its AdamW state (see the module docstring)."""
    exp_avg, exp_avg_sq = saved["exp_avg"], saved["exp_avg_sq"]
    codes, magnitude = _quantised(optimizer, exp_avg, period)
    v = exp_avg_sq.reshape(-1).to(compute_dtype(exp_avg.dtype))
    vmean = v.view(-1, period).mean(dim=1) if period > 1 else v
    return {
        "period": period,
        "codes": codes,
        "magnitude": magnitude,
        "vmean": vmean.to(exp_avg.dtype),
        "step": torch.as_tensor(saved["step"], dtype=torch.float32, device=exp_avg.device),
    }


def _quantised(optimizer, moment: torch.Tensor, period: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, flat) and block magnitudes (``moment``'s dtype) of a first moment, as a
    step stores them."""
    dtype = moment.dtype
    if dtype not in STATE_DTYPES:
        raise TypeError(
            f"{optimizer._name}: a saved moment has dtype {dtype}; {optimizer._name} keeps "
            f"state in {STATE_DTYPES}: cast the parameter before converting"
        )
    n = moment.numel()
    m = as_blocks(moment.reshape(-1).to(compute_dtype(dtype)),
                  optimizer.variant.magnitude_block(n, period))
    magnitude = torch.empty(m.shape[0], dtype=dtype, device=m.device)
    codes = quantise_blocks(m, magnitude, optimizer._nearest).view(-1)[:n]
    return codes.to(torch.uint8), magnitude
