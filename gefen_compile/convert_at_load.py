"""An AdamW (Adam, Muon) that the compiler backend or the patch would convert at its first step,
converted when it loads a Gefen (GefenMuon) checkpoint instead.

A run resumed from its own checkpoint loads it before the first step: a real AdamW would refuse
Gefen's state (checkpoint.py), and a Muon would silently start from zero momentum. While a rule
is installed (the backend's from its first use in a process on, the patch's while patched),
``load_state_dict`` of such an optimizer meeting a Gefen-family checkpoint converts it, then
loads the checkpoint as Gefen; everything else loads as before. The method is set on
``torch.optim.Adam`` (AdamW's base) and ``torch.optim.Muon`` only while a rule is installed, and
hands on to the next ``load_state_dict`` in the MRO: Gefen's for a converted optimizer,
``Optimizer``'s otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.optim import Adam, Muon, Optimizer

from .convert import convert
from .learned_state import LearnedState

_RULES: dict[str, Callable[[Optimizer], bool]] = {}  # who installed it -> what it converts


def install(owner: str, converts: Callable[[Optimizer], bool]) -> None:
    """Convert at load the optimizers for which ``converts`` is true (``owner``: who asks,
    for :func:`remove`)."""
    _RULES[owner] = converts
    for cls, load in _LOADERS.items():
        cls.load_state_dict = load


def remove(owner: str) -> None:
    """Drop ``owner``'s rule; with none left, Adam and Muon load as they do without
    gefen_compile."""
    _RULES.pop(owner, None)
    if not _RULES:
        for cls, load in _LOADERS.items():
            if vars(cls).get("load_state_dict") is load:
                del cls.load_state_dict


def is_gefen_checkpoint(state_dict: dict[str, Any]) -> bool:
    """Whether ``state_dict`` was saved by Gefen or GefenMuon: a codebook, at the top level or
    in its entries (torch's distributed state_dict helpers keep only the entries), or codes."""
    entries = state_dict.get("state", {}).values()
    return "codebook" in state_dict or any(
        isinstance(entry, dict) and "codes" in entry for entry in entries)


def _loader(cls: type) -> Callable[[Optimizer, dict[str, Any]], None]:
    def load_state_dict(self: Optimizer, state_dict: dict[str, Any]) -> None:
        if (not isinstance(self, LearnedState) and is_gefen_checkpoint(state_dict)
                and _same_groups(self, state_dict)
                and any(converts(self) for converts in _RULES.values())):
            convert(self)
        super(cls, self).load_state_dict(state_dict)

    load_state_dict.__doc__ = Optimizer.load_state_dict.__doc__
    return load_state_dict


def _same_groups(optimizer: Optimizer, state_dict: dict[str, Any]) -> bool:
    """Whether the saved param groups have the optimizer's shape (as many groups, as many
    parameters in each): a load refused for that leaves the optimizer unconverted."""
    saved = state_dict.get("param_groups", [])
    return [len(g["params"]) for g in saved] == [len(g["params"]) for g in optimizer.param_groups]


_LOADERS = {cls: _loader(cls) for cls in (Adam, Muon)}
