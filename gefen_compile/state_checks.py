"""What Gefen's state must look like before the kernels read it (GEFEN_SPEC "State per
parameter"): the codebook, and each parameter's entry against its parameter and period.

Loaded checkpoints and state assigned into ``optimizer.state[p]`` are checked here before they
replace anything: the C kernel trusts these sizes, so a wrong one would read or write outside
a buffer. Each check returns a description of the first problem (None when there is none);
callers add where the state came from and the fix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .codebook import CODEBOOK_SIZE, NearestCode
from .distributed import is_sharded, local_grad
from .state import STATE_DTYPES, state_sizes
from .variant import Variant

ENTRY_KEYS = ("codes", "magnitude", "vmean", "step", "period")
MOMENTUM_KEYS = ("codes", "magnitude", "period")  # GefenMuon's


def codebook_problem(codebook: Any) -> str | None:
    """Why ``codebook`` is not a Gefen codebook: 256 finite floats, non-decreasing, in [-1, 1],
    distinct ones at least 2**-22 apart."""
    if not isinstance(codebook, Tensor):
        return f"is a {type(codebook).__name__}, not a tensor"
    if codebook.shape != (CODEBOOK_SIZE,) or not codebook.is_floating_point():
        return (f"has shape {tuple(codebook.shape)} and dtype {codebook.dtype}; a Gefen "
                f"codebook is {CODEBOOK_SIZE} floating-point values")
    values = codebook.detach().cpu().double()  # 256 values, read once at load
    if not (bool(values.isfinite().all()) and bool((values.abs() <= 1).all())
            and bool((values[1:] >= values[:-1]).all())):
        return "is not finite, non-decreasing and within [-1, 1]"
    try:  # the lookup tables every step needs: checked before a load replaces anything
        NearestCode(values.float())
    except ValueError:
        return "has distinct entries closer than 2**-22 apart, which no lookup table separates"
    return None


def entry_problem(entry: dict, param: Tensor, variant: Variant,
                  second_moments: bool = True) -> str | None:
    """Why ``entry`` is not the state of ``param`` (its local tensor, for a DTensor): every key,
    uint8 codes with one per element, magnitude and vmean of the lengths its period gives (as
    ``variant`` lays them out), in
    the parameter's dtype (the state dtype is the gradient's, which must be the parameter's),
    and a one-element step. Without ``second_moments``: GefenMuon's entry, codes, magnitude
    and period."""
    keys = ENTRY_KEYS if second_moments else MOMENTUM_KEYS
    missing = [k for k in keys if k not in entry]
    if missing:
        return f"has no {', '.join(map(repr, missing))} (an entry has {keys})"
    n, period = param.numel(), entry["period"]
    if type(period) is not int or period < 1 or (period > 1 and n % period):
        return (f"has period {period!r}, which is not a positive int dividing the parameter's "
                f"{n} elements")
    magnitude, vmean = state_sizes(n, period, variant)
    expected = {"codes": ((n,), torch.uint8), "magnitude": ((magnitude,), param.dtype)}
    if second_moments:
        expected["vmean"] = ((vmean,), param.dtype)
    for key, (shape, dtype) in expected.items():
        value = entry[key]
        if not isinstance(value, Tensor):
            return f"has {key} of type {type(value).__name__}, not a tensor"
        # codes are saved in the parameter's shape (checkpoint.py), or flat (live; older layout)
        if key == "codes" and value.dim() != 1 and value.shape != param.shape:
            return (f"has codes of shape {tuple(value.shape)}: they were saved for a parameter "
                    f"of that shape, and this one has shape {tuple(param.shape)}")
        size = (value.numel(),) if key == "codes" else tuple(value.shape)
        if (size, value.dtype) != (shape, dtype):
            return (f"has {key} of shape {tuple(value.shape)} and dtype {value.dtype}; the "
                    f"parameter ({n} elements, {param.dtype}, period {period}) needs "
                    f"{shape[0]} elements of {dtype}")
    if not second_moments:
        return None
    step = entry["step"]
    if not (isinstance(step, Tensor) and step.numel() == 1 and not step.is_complex()):
        return f"has step {step!r}; it must be a one-element real tensor"
    return None


# Why an entry whose step is checkpoint.py's marker is refused, with the fix: no other fix holds.
SAVED_ENTRY = (
    "is a saved checkpoint entry (its step is Gefen's marker) put into optimizer.state directly, "
    "not through load_state_dict, as ZeroRedundancyOptimizer.load_state_dict puts each rank's "
    "entries: Gefen cannot resume under ZeroRedundancyOptimizer; its state being 1 byte per "
    "parameter, train under plain DDP and save optimizer.state_dict() from rank 0"
)


def check_real(p: Tensor, where: str) -> None:
    if p.is_complex() or not p.is_floating_point():
        fix = ("pass torch.view_as_real(p) instead" if p.is_complex()
               else "leave this tensor out of the optimizer")
        raise TypeError(
            f"Gefen: {where} has dtype {p.dtype}; Gefen updates real floating-point parameters "
            f"only: {fix}"
        )


def check_materialised(param: Tensor, where: str, name: str = "Gefen") -> None:
    """Refuse a parameter on the meta device (no data to update), with the fix."""
    if param.is_meta:
        raise ValueError(
            f"{name}: {where} is on the meta device (it has a shape but no data), so there is "
            "nothing to update; materialise the model first, then build the optimizer over "
            "its parameters: model.to_empty(device=...), initialise the weights (or load a "
            f"checkpoint), then {name}(model.parameters(), ...) (to_empty makes new parameters)"
        )


def check_plain(tensor: Tensor, what: str, name: str = "Gefen") -> None:
    """Refuse a tensor subclass that wraps other tensors (DTensor aside, which the caller has
    turned into its local shard): the kernels read a tensor's own memory, which it has none of."""
    if is_traceable_wrapper_subclass(tensor) and not is_sharded(tensor):
        raise TypeError(
            f"{name}: {what} is a {type(tensor).__name__}, a tensor subclass that wraps other "
            f"tensors; {name} steps plain tensors (and DTensor shards): leave this parameter to "
            "another optimizer, or give the optimizer the plain tensor it wraps"
        )


def checked_gradient(p: Tensor, where: str, name: str, sparse_error: str) -> Tensor:
    """``p``'s gradient (its local shard for a DTensor), refused where the kernels cannot read
    it or keep state for it. ``name``: the optimizer's, for messages; ``sparse_error``: the
    message of the original's own error (a RuntimeError, as AdamW's and Muon's)."""
    g = p.grad
    check_materialised(p, where, name)
    check_plain(p, where, name)
    check_plain(g, f"the gradient of {where}", name)
    if g.is_sparse:
        raise RuntimeError(sparse_error)
    if g.is_complex():
        raise RuntimeError(
            f"{name} does not support complex gradients ({where}); optimize torch.view_as_real(p)"
        )
    check_gradient_layout(p, g, where, name)
    if g.dtype != p.dtype:  # refused before the first step builds state in g's dtype
        raise ValueError(
            f"{name}: the gradient of {where} has dtype {g.dtype}, the parameter {p.dtype}; "
            f"{name} keeps its state in one dtype and updates the parameter from it in place: "
            "give the gradient the parameter's dtype (p.grad = p.grad.to(p.dtype); autograd "
            "makes one of another dtype only where p.grad_dtype allows it)"
        )
    return local_grad(p, g, where)


def check_gradient_layout(param: Tensor, grad: Tensor, where: str, name: str = "Gefen") -> None:
    """Refuse a gradient whose dtype cannot be a state dtype, or whose shape is not the
    parameter's (``name``: the optimizer, for the message)."""
    if grad.dtype not in STATE_DTYPES:
        raise TypeError(
            f"{name}: the gradient of {where} has dtype {grad.dtype}; {name} keeps state in "
            "float32, bfloat16, float16 or float64: cast the parameter to one of these"
        )
    if grad.shape != param.shape:
        raise ValueError(
            f"{name}: the gradient of {where} has shape {tuple(grad.shape)}, the parameter "
            f"{tuple(param.shape)}; the gradient must have the parameter's shape"
        )


def moved(what: str, device: torch.device, state_device: torch.device) -> ValueError:
    """The error for a parameter (``what``: the optimizer and the parameter) found on
    ``device`` while its state is on ``state_device``."""
    return ValueError(
        f"{what} is on {device}, but its state is on {state_device}, where its first step "
        "found it (the model moved after the optimizer stepped: model.to(device) moves "
        "parameters, not optimizer state); build the optimizer again after moving the model, "
        "or load its state_dict into one built after the move"
    )
