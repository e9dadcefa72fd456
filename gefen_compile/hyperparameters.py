"""Checks of Gefen's hyperparameters, with ``torch.optim.AdamW``'s error types and wording.

Code and tests written against AdamW match its messages ("Invalid beta parameter at index 0:
1.0"), so each message starts with AdamW's own text and Gefen's advice follows in parentheses.
Unlike AdamW, the values of every param group are checked (they reach the kernels), not only
the constructor's defaults.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def check_hyperparameters(values: dict[str, Any], where: str, saved: bool = False,
                          edited: bool = False) -> None:
    """Raise AdamW's error (ValueError; NotImplementedError for what Gefen does not do) for
    invalid ``values`` (a param group, or the constructor's defaults; ``saved``: a checkpoint's
    group), naming ``where``. ``edited``: values set since the group was checked, as AdamW's
    step takes them: their tensors are not read (a host sync on a GPU), and a pair of a float
    and a tensor (OneCycleLR's betas over tensor ones) is taken."""
    lr, betas, eps, weight_decay = (values[k] for k in ("lr", "betas", "eps", "weight_decay"))
    if values.get("amsgrad"):
        fix = ("load this checkpoint into torch.optim.AdamW(amsgrad=True): its max of the second "
               "moment has no place in Gefen's state" if saved
               else "use torch.optim.AdamW(amsgrad=True), or Gefen with amsgrad=False")
        raise NotImplementedError(
            f"{where}: amsgrad=True is not Gefen (it needs a full-size max of the second "
            f"moment); {fix}"
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
    def read(value: Any) -> bool:  # whether the value's sign and range may be read
        return not (edited and isinstance(value, Tensor))

    if read(lr) and not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr} ({where}: use lr >= 0)")
    if read(eps) and not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps} ({where}: use eps >= 0)")
    betas = beta_pair(betas, where)
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor) and beta.numel() != 1:  # before comparing it
            raise ValueError(f"Tensor betas[{i}] must be 1-element ({where}: got shape "
                             f"{tuple(beta.shape)})")
        if read(beta) and not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} ({where}: use "
                             "0 <= beta < 1)")
    if read(weight_decay) and not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} ({where}: use "
                         "weight_decay >= 0)")
    # A group without the key (saved by torch before 2.6) is AdamW's, decoupled.
    if not values.get("decoupled_weight_decay", True) and read(weight_decay) and weight_decay != 0:
        raise ValueError(
            f"{where} has weight_decay={weight_decay} applied as L2 (Adam's coupled decay, "
            "decoupled_weight_decay=False), which Gefen does not implement; use decoupled "
            "weight decay (torch.optim.AdamW, or decoupled_weight_decay=True), or weight_decay=0"
        )
    if not edited and isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError(f"betas must be either both floats or both Tensors ({where}: got "
                         f"{type(betas[0]).__name__} and {type(betas[1]).__name__})")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor) and foreach_only:
            raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False "
                             f"and foreach=True {advice}")


def beta_pair(betas: Any, where: str) -> tuple:
    """``betas`` as a tuple (beta1, beta2): any sequence of two numbers or tensors that AdamW
    takes (a tuple or list, a numpy array, the ListConfig a Hydra config gives); a ValueError
    for another length or no sequence, a TypeError for an item that is not a number."""
    pair = _pair(betas)
    if pair is None:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r} ({where}: pass "
                         "two floats or two one-element tensors, in a tuple or any sequence)")
    for i, beta in enumerate(pair):
        # What the step can read: a tensor, or anything float() takes but a string.
        if not (isinstance(beta, Tensor) or hasattr(type(beta), "__float__")):
            raise TypeError(f"betas[{i}] must be a float or a one-element tensor, got "
                            f"{type(beta).__name__} {beta!r} ({where}: betas={betas!r})")
    return pair


def scalar_betas(betas: Any) -> Any:
    """``betas`` as a tuple with one-element tensors made 0-d, as AdamW's constructor stores
    them; anything that is not a pair is returned as it is, for :func:`check_hyperparameters`
    to refuse."""
    pair = _pair(betas)
    if pair is None:
        return betas
    return tuple(b.reshape(()) if isinstance(b, Tensor) and b.dim() and b.numel() == 1 else b
                 for b in pair)


def _pair(betas: Any) -> tuple | None:
    """``tuple(betas)`` where ``betas`` is a sized sequence of two items (not a string), else
    None. Sized: a one-shot iterator would be used up by the check, leaving the group empty."""
    if isinstance(betas, (str, bytes)):
        return None
    try:
        return tuple(betas) if len(betas) == 2 else None
    except TypeError:  # no len() (a float, a 0-d tensor, an iterator), or not iterable
        return None
