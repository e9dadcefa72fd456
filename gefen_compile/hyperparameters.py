"""Checks of Gefen's hyperparameters, with ``torch.optim.AdamW``'s error types and wording.

Code and tests written against AdamW match its messages ("Invalid beta parameter at index 0:
1.0"), so each message starts with AdamW's own text and Gefen's advice follows in parentheses.
Unlike AdamW, the values of every param group are checked (they reach the kernels), not only
the constructor's defaults.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def check_hyperparameters(values: dict[str, Any], where: str) -> None:
    """Raise AdamW's error (ValueError; NotImplementedError for what Gefen does not do) for
    invalid ``values`` (a param group, or the constructor's defaults), naming ``where``."""
    lr, betas, eps, weight_decay = (values[k] for k in ("lr", "betas", "eps", "weight_decay"))
    if values.get("amsgrad"):
        raise NotImplementedError(
            f"{where}: amsgrad=True is not Gefen (it needs a full-size max of the second "
            "moment); use torch.optim.AdamW(amsgrad=True), or Gefen with amsgrad=False"
        )
    if values.get("differentiable"):
        raise NotImplementedError(
            f"{where}: differentiable=True is not supported (the quantised state is not "
            "differentiable); use torch.optim.AdamW(differentiable=True)"
        )
    # AdamW refuses tensor hyperparameters for its foreach implementation unless capturable;
    # Gefen only records foreach, but refuses what AdamW refuses, so a script moves both ways.
    foreach_only = values.get("foreach") and not values.get("capturable")
    advice = f"({where}: pass capturable=True, or leave foreach unset)"
    if isinstance(lr, Tensor):
        if foreach_only:
            raise ValueError("lr as a Tensor is not supported for capturable=False and "
                             f"foreach=True {advice}")
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element ({where}: got shape "
                             f"{tuple(lr.shape)}; use a float or a one-element tensor)")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr} ({where}: use lr >= 0)")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps} ({where}: use eps >= 0)")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor) and beta.numel() != 1:  # before comparing it
            raise ValueError(f"Tensor betas[{i}] must be 1-element ({where}: got shape "
                             f"{tuple(beta.shape)})")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} ({where}: use "
                             "0 <= beta < 1)")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} ({where}: use "
                         "weight_decay >= 0)")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError(f"betas must be either both floats or both Tensors ({where}: got "
                         f"{type(betas[0]).__name__} and {type(betas[1]).__name__})")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor) and foreach_only:
            raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False "
                             f"and foreach=True {advice}")


def scalar_betas(betas: tuple) -> tuple:
    """``betas`` with one-element tensors made 0-d, as AdamW's constructor stores them (others
    are left for :func:`check_hyperparameters` to refuse)."""
    return tuple(b.reshape(()) if isinstance(b, Tensor) and b.dim() and b.numel() == 1 else b
                 for b in betas)
