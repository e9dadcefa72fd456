"""``patch_adamw``: from then on ``torch.optim.AdamW(...)`` builds Gefen, with no other change to
the user's code (or a library's: Hugging Face's Trainer builds ``torch.optim.AdamW`` itself).

The patched name is a class, :class:`PatchedAdamW`, with AdamW's signature: ``torch.optim.AdamW``
still constructs, subclasses and passes ``isinstance`` checks as before (every real AdamW, made
before the patch or not, is still an instance of it). What it builds is a
:class:`~gefen_compile.convert.GefenAdamW`: AdamW's constructor checks the arguments as AdamW
does, then the optimizer is converted before it allocates any state.

References taken before the patch (``from torch.optim import AdamW`` at import time, a
registry such as timm's holding the class) build real AdamWs: while patched, a global optimizer
step pre-hook converts them at their first step, before AdamW allocates its state, as the
compiler backend does.

Subclasses are converted only where their update is AdamW's (the rule, in one place):

- a class statement naming the patched ``torch.optim.AdamW`` as a base makes a plain subclass of
  the real AdamW, exactly as without the patch, so what follows holds however it was defined;
- a subclass that does not override ``step`` is converted at its first step;
- a subclass that overrides ``step`` is watched during its first step: if its ``step`` reaches
  AdamW's (``super().step()``), it is converted right there, before AdamW allocates anything,
  and from then on Gefen's update runs, once per step, where it calls ``super().step()``; if its
  ``step`` finishes without reaching AdamW's (an update of its own), it is left as it is, a
  real AdamW subclass, and logged.

An AdamW with an option Gefen refuses (``amsgrad=True``, say) met at its first step is left as
AdamW, with a warning; built from the patched name it raises, naming the way out.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
from collections.abc import Iterator

import torch
from torch.optim import AdamW
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from .convert import (GefenAdamW, GefenStep, check_convertible, convert, gefen_step_above,
                      own_class, overrides_step, set_default_variant)
from .optim import Gefen

log = logging.getLogger("gefen_compile")

_ORIGINAL = AdamW
_MODULES = (torch.optim, importlib.import_module("torch.optim.adamw"))
_hooks: list = []  # the global step hooks, while patched
_probes: dict[type, type] = {}


class _AdamWName(type):
    """The patched class answers isinstance/issubclass as ``torch.optim.AdamW`` does, and a
    class statement deriving from it derives from the real AdamW instead."""

    def __new__(mcls, name, bases, namespace, **kwargs):
        if any(isinstance(base, _AdamWName) for base in bases):
            bases = tuple(_ORIGINAL if isinstance(b, _AdamWName) else b for b in bases)
            return type(name, bases, namespace, **kwargs)
        return super().__new__(mcls, name, bases, namespace, **kwargs)

    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, _ORIGINAL)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, _ORIGINAL)


class PatchedAdamW(GefenAdamW, metaclass=_AdamWName):
    """What ``torch.optim.AdamW`` is while patched: AdamW's constructor, then Gefen."""

    # inspect.signature(torch.optim.AdamW) stays AdamW's (nanoGPT looks for "fused" in it).
    __signature__ = inspect.signature(_ORIGINAL)

    def __init__(self, *args, **kwargs) -> None:
        cls = type(self)
        # Built as a plain AdamW (its argument checks; Gefen's __init__ would come next in the
        # MRO), then converted. A subclass calling torch.optim.AdamW.__init__ explicitly keeps
        # its class.
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


def patch_adamw(*, variant: str = "robust") -> None:
    """Make ``torch.optim.AdamW`` (and ``torch.optim.adamw.AdamW``) build Gefen, and convert
    every other AdamW at its first step (module docstring), until :func:`unpatch_adamw`.
    ``variant``: as for ``Gefen``; every conversion from then on uses it (the compiler
    backend's too). Patching twice is harmless."""
    set_default_variant(variant, "patch_adamw")
    for module in _MODULES:
        module.AdamW = PatchedAdamW
    if not _hooks:
        _hooks.append(register_optimizer_step_pre_hook(_before_step))
        _hooks.append(register_optimizer_step_post_hook(_after_step))


def unpatch_adamw() -> None:
    """Restore ``torch.optim.AdamW`` and stop converting AdamWs at their first step. Optimizers
    already converted stay Gefen."""
    set_default_variant("robust", "unpatch_adamw")
    for module in _MODULES:
        module.AdamW = _ORIGINAL
    while _hooks:
        _hooks.pop().remove()


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


def _before_step(optimizer, args, kwargs) -> None:
    # These tests trace (guarded on the type and an attribute), so a compiled step of any
    # other optimizer, or of one already decided, keeps a single graph.
    if (isinstance(optimizer, _ORIGINAL) and not isinstance(optimizer, (Gefen, GefenStep))
            and not getattr(optimizer, "_gefen_left_alone", False)):
        _convert_at_first_step(optimizer)


@torch._dynamo.disable  # eagerly, also inside a compiled step, before AdamW allocates
def _convert_at_first_step(optimizer: AdamW) -> None:
    try:
        check_convertible(optimizer)
    except (TypeError, ValueError, NotImplementedError) as error:
        _leave_alone(optimizer, f"{error}", logging.WARNING)
        return
    cls = type(optimizer)
    if overrides_step(cls):  # decided in this step: GefenStep.step converts it, or _after_step
        optimizer.__class__ = _probe(cls)
    else:
        convert(optimizer)


def _after_step(optimizer, args, kwargs) -> None:
    if isinstance(optimizer, GefenStep) and not isinstance(optimizer, Gefen):
        _end_probe(optimizer)


@torch._dynamo.disable
def _end_probe(optimizer) -> None:
    optimizer.__class__ = own_class(optimizer)
    _leave_alone(optimizer, "its step() has an update of its own (it does not call "
                            "super().step())", logging.INFO)


def _probe(cls: type) -> type:
    """``cls`` with :class:`~gefen_compile.convert.GefenStep` right above AdamW: whether its
    ``step`` reaches AdamW's shows in its first step."""
    if cls not in _probes:
        _probes[cls] = type(cls.__name__, (cls, gefen_step_above(cls)),
                            {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _probes[cls]


def _leave_alone(optimizer, why: str, level: int) -> None:
    optimizer._gefen_left_alone = True
    cls = own_class(optimizer)
    log.log(level, "left %s.%s as it is, not Gefen: %s", cls.__module__, cls.__qualname__, why)
