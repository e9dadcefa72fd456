"""``patch_adamw``: from then on ``torch.optim.AdamW(...)`` builds Gefen, with no other change to
the user's code (or a library's: Hugging Face's Trainer builds ``torch.optim.AdamW`` itself).

The patched name is a class, :class:`PatchedAdamW`: ``torch.optim.AdamW`` still constructs,
subclasses and passes ``isinstance`` checks as before (every real AdamW, made before the patch
or not, is still an instance of it). What it builds is a :class:`~gefen_compile.convert.GefenAdamW`:
AdamW's constructor checks the arguments as AdamW does, then the optimizer is converted before
it allocates any state. References taken before the patch (``from torch.optim import AdamW`` at
import time) keep the original class; the runner (``python -m gefen_compile``) patches before
the script imports anything.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
from torch.optim import AdamW

from .convert import GefenAdamW, convert

_ORIGINAL = AdamW
_MODULES = (torch.optim, importlib.import_module("torch.optim.adamw"))


class _AdamWName(type):
    """The patched class answers isinstance/issubclass as ``torch.optim.AdamW`` does."""

    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, _ORIGINAL)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, _ORIGINAL)


class PatchedAdamW(GefenAdamW, metaclass=_AdamWName):
    """What ``torch.optim.AdamW`` is while patched: AdamW's constructor, then Gefen."""

    def __init__(self, *args, **kwargs) -> None:
        cls = type(self)
        # Built as a plain AdamW (its argument checks; Gefen's __init__ would come next in the
        # MRO), then converted; a user's subclass of the patched name keeps its class.
        self.__class__ = _ORIGINAL
        _ORIGINAL.__init__(self, *args, **kwargs)
        self.__class__ = GefenAdamW if cls is PatchedAdamW else cls
        try:
            convert(self)
        except (TypeError, ValueError, NotImplementedError) as error:
            raise type(error)(
                f"{error} (torch.optim.AdamW builds Gefen while gefen_compile.patch_adamw() is "
                "in effect: call gefen_compile.unpatch_adamw() to build a real AdamW)"
            ) from None


def patch_adamw() -> None:
    """Make ``torch.optim.AdamW`` (and ``torch.optim.adamw.AdamW``) build Gefen, until
    :func:`unpatch_adamw`. Patching twice is harmless."""
    for module in _MODULES:
        module.AdamW = PatchedAdamW


def unpatch_adamw() -> None:
    """Restore ``torch.optim.AdamW``. Optimizers built while patched stay Gefen."""
    for module in _MODULES:
        module.AdamW = _ORIGINAL


def is_patched() -> bool:
    """Whether ``torch.optim.AdamW`` currently builds Gefen."""
    return torch.optim.AdamW is PatchedAdamW


@contextlib.contextmanager
def patched_adamw() -> Iterator[None]:
    """``with patched_adamw():`` AdamW builds Gefen inside the block; the previous state is
    restored on exit (so nested use, or use under the runner, keeps the patch)."""
    was_patched = is_patched()
    patch_adamw()
    try:
        yield
    finally:
        if not was_patched:
            unpatch_adamw()
