"""``patch_adamw``: from then on ``torch.optim.AdamW(...)`` builds Gefen, with no other change to
the user's code (or a library's: Hugging Face's Trainer builds ``torch.optim.AdamW`` itself).
``patch_muon`` does the same for ``torch.optim.Muon`` and GefenMuon; everything below holds for
it with Muon in place of AdamW.

The patched name is a class, :class:`PatchedAdamW`, with AdamW's name (a pickle of it names
``torch.optim.adamw.AdamW``) and signature: ``torch.optim.AdamW``
still constructs, subclasses and passes ``isinstance`` checks as before (every real AdamW, made
before the patch or not, is still an instance of it). What it builds is a
:class:`~gefen_compile.convert.GefenAdamW`: AdamW's constructor checks the arguments as AdamW
does, then the optimizer is converted before it allocates any state.

References taken before the patch (``from torch.optim import AdamW`` at import time, a
registry such as timm's holding the class) build real AdamWs: while patched, a global optimizer
step pre-hook converts them at their first step, before AdamW allocates its state, as the
compiler backend does; or, where they load a Gefen checkpoint before it, at that load
(convert_at_load.py).

Subclasses are converted only where their update is AdamW's (the rule, in one place):

- a class statement naming the patched ``torch.optim.AdamW`` as a base makes a plain subclass of
  the real AdamW, exactly as without the patch, so what follows holds however it was defined;
- a subclass that does not override ``step`` is converted at its first step;
- a subclass that overrides ``step`` is watched from its first step on: once its ``step``
  reaches AdamW's (``super().step()``), it is converted right there, before AdamW allocates
  anything, and from then on Gefen's update runs, once per step, where it calls
  ``super().step()``; once a ``step`` finishes without reaching AdamW's but having changed a
  parameter in place or left state in ``optimizer.state`` (an update of its own), it is left as
  it is, a real AdamW subclass, with a warning. A ``step`` that did neither (it calls
  ``super().step()`` every few calls) is watched again at the next;
- a subclass calling ``torch.optim.AdamW.__init__(self, ...)`` explicitly keeps its class,
  decided by the rules above.

An AdamW with an option Gefen refuses (``amsgrad=True``, a complex parameter) is left as AdamW
with a warning naming the option, whether built from the patched name or met at its first step:
the runner converts what Gefen can replace and runs the rest as written.
"""

from __future__ import annotations

import contextlib
import copyreg
import importlib
import inspect
import logging
import sys
import weakref
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.optim import Adam, AdamW, Muon
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from . import convert_at_load
from .convert import (ConvertedMuon, GefenAdamW, GefenStep, convert, gefen_step_above,
                      own_class, overrides_step, refusal, set_default_variant)
from .distributed import local
from .eager import eager
from .learned_state import LearnedState

log = logging.getLogger("gefen_compile")

_hooks: list = []  # the global step hooks, while anything is patched
_probes: dict[type, type] = {}
# Of each optimizer in a probed step: its parameters as the step began (_fingerprint).
_probe_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _OriginalName(type):
    """A patched class answers isinstance/issubclass as the original (``torch.optim.AdamW``,
    say) does, and a class statement deriving from it derives from the original instead."""

    def __new__(mcls, name, bases, namespace, **kwargs):
        if any(isinstance(base, _OriginalName) for base in bases):
            bases = tuple(b._original if isinstance(b, _OriginalName) else b for b in bases)
            return type(name, bases, namespace, **kwargs)
        return super().__new__(mcls, name, bases, namespace, **kwargs)

    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, cls._original)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, cls._original)

    def __repr__(cls) -> str:  # named as the original, it says what it is
        return f"<class '{cls.__module__}.{cls.__qualname__}' (patched: builds {cls._builds})>"


def _pickled_patched_class(cls: _OriginalName) -> str | tuple:
    """A patched class pickles as the original's name: a plain global while the name holds
    it; else (a reference kept after unpatching) a lookup of the name when loaded, which finds
    what it means then: the original, where nothing is patched (no gefen_compile needed)."""
    module, name = cls.__module__, cls.__qualname__
    if getattr(sys.modules.get(module), name, None) is cls:
        return name
    return getattr, (_ModuleNamed(module), name)


class _ModuleNamed:
    """Pickles as ``importlib.import_module(name)`` (a module itself does not pickle)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple:
        return importlib.import_module, (self.name,)


copyreg.pickle(_OriginalName, _pickled_patched_class)


def _patched_class(original: type, converted: type, target: str) -> type:
    """What ``torch.optim.<original>`` is while patched: the original's constructor, then the
    conversion to ``converted``."""

    def __init__(self, *args, **kwargs) -> None:
        cls = type(self)
        # Built as a plain original (its argument checks; Gefen's __init__ would come next in
        # the MRO), then converted.
        self.__class__ = original
        original.__init__(self, *args, **kwargs)
        if cls is not patched:
            # A subclass calling torch.optim.AdamW.__init__ explicitly keeps its class, and
            # its first step decides, as for any subclass (its step may be its own update).
            # Its step gets the step hooks that Optimizer.__init__ gave the original's.
            self.__class__ = cls
            self._patch_step_function()
            return
        error = refusal(self)
        if error is not None:
            _leave_alone(self, f"{error}", logging.WARNING)  # the real original, as without
            return
        self.__class__ = converted
        convert(self)

    # Named as the original, so a pickle of the class (Hugging Face saves the optimizer's
    # class in training_args.bin) refers to the original's name: it loads as the original
    # without gefen_compile, and as this class while patched.
    patched = _OriginalName(original.__name__, (converted,), {
        "__doc__": f"What ``torch.optim.{original.__name__}`` is while patched: its "
                   f"constructor, then {target}.",
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__init__": __init__,
        "_original": original,
        "_builds": target,
        # inspect.signature stays the original's (nanoGPT looks for "fused" in AdamW's).
        "__signature__": inspect.signature(original),
    })
    return patched


PatchedAdamW = _patched_class(AdamW, GefenAdamW, "Gefen")
PatchedMuon = _patched_class(Muon, ConvertedMuon, "GefenMuon")
# Where each original is looked up: the package and its own module.
_MODULES = {AdamW: (torch.optim, importlib.import_module("torch.optim.adamw")),
            Muon: (torch.optim, importlib.import_module("torch.optim._muon"))}
_PATCHED = {AdamW: PatchedAdamW, Muon: PatchedMuon}
_watched: tuple[type, ...] = ()  # the originals patched now, converted at their first step


def _patch(original: type, variant: str, where: str) -> None:
    global _watched
    set_default_variant(variant, where, Muon if original is Muon else Adam)
    for module in _MODULES[original]:
        setattr(module, original.__name__, _PATCHED[original])
    _watched = tuple({*_watched, original})
    if not _hooks:
        _hooks.append(register_optimizer_step_pre_hook(_before_step))
        _hooks.append(register_optimizer_step_post_hook(_after_step))
        convert_at_load.install("patch", _converts_at_load)


def _unpatch(original: type, where: str) -> None:
    global _watched
    for module in _MODULES[original]:
        setattr(module, original.__name__, original)
    _end_probes(original)
    _watched = tuple(w for w in _watched if w is not original)
    set_default_variant("robust", where, Muon if original is Muon else Adam)
    if not _watched:
        while _hooks:
            _hooks.pop().remove()
        convert_at_load.remove("patch")


def patch_adamw(*, variant: str = "robust") -> None:
    """Make ``torch.optim.AdamW`` (and ``torch.optim.adamw.AdamW``) build Gefen, and convert
    every other AdamW at its first step (module docstring), until :func:`unpatch_adamw`.
    ``variant``: as for ``Gefen``; every conversion from then on uses it (the compiler
    backend's too). Patching twice is harmless."""
    _patch(AdamW, variant, "patch_adamw")


def unpatch_adamw() -> None:
    """Restore ``torch.optim.AdamW`` and stop converting AdamWs at their first step. Optimizers
    already converted stay Gefen."""
    _unpatch(AdamW, "unpatch_adamw")


def patch_muon(*, variant: str = "robust") -> None:
    """Make ``torch.optim.Muon`` build GefenMuon, and convert every other Muon at its first
    step, until :func:`unpatch_muon`: :func:`patch_adamw` for Muon (the runner applies both).
    ``variant``: as for ``GefenMuon``, and for every conversion from then on."""
    _patch(Muon, variant, "patch_muon")


def unpatch_muon() -> None:
    """Restore ``torch.optim.Muon`` and stop converting Muons at their first step. Optimizers
    already converted stay GefenMuon."""
    _unpatch(Muon, "unpatch_muon")


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
    if (isinstance(optimizer, _watched) and not isinstance(optimizer, LearnedState)
            and not getattr(optimizer, "_gefen_left_alone", False)):
        _watch_step(optimizer)


def _converts_at_load(optimizer) -> bool:
    """Whether a Gefen checkpoint loaded into ``optimizer`` converts it first: one the first
    step would convert. A subclass overriding ``step`` is decided by its step, but a Gefen
    checkpoint says that its step reached AdamW's in the run that saved it."""
    return isinstance(optimizer, _watched) and refusal(optimizer) is None


@eager  # also inside a compiled step, before AdamW allocates
def _watch_step(optimizer) -> None:
    """Convert ``optimizer`` at its first step, or, where its class overrides ``step``, probe
    this step: GefenStep.step converts it where it reaches AdamW's, or _after_step decides.
    Checked at every probed step: a group added since may hold what Gefen refuses."""
    error = refusal(optimizer)
    if error is not None:
        optimizer.__class__ = own_class(optimizer)
        _probe_fingerprints.pop(optimizer, None)
        _leave_alone(optimizer, f"{error}", logging.WARNING)
        return
    if not isinstance(optimizer, GefenStep) and not overrides_step(type(optimizer)):
        convert(optimizer)
        return
    fingerprint = _fingerprint(optimizer)  # before the class changes: it may raise
    optimizer.__class__ = _probe(own_class(optimizer))
    _probe_fingerprints[optimizer] = fingerprint


def _fingerprint(optimizer) -> tuple[list, list, torch.Tensor | None]:
    """What an update of its own would change, as a probed step begins and ends: the
    parameters' version counters (in-place updates bump them), the state's entries, their
    tensors and versions, and the bits of the parameters' sums (which also see updates made
    through ``p.data``, as old-style code does, bumping no counter; not of meta or fake
    tensors, which have no values). Only around probed steps (a subclass's first steps): a
    host read per parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = [(id(p), *((key, id(v), getattr(v, "_version", None)) for key, v in entry.items()))
             for p, entry in optimizer.state.items() if entry]
    sums = [local(p).detach().sum(dtype=torch.float64).cpu() for p in params if _has_values(p)]
    sums = torch.stack(sums).view(torch.int64) if sums else None
    return [p._version for p in params], state, sums


def _has_values(p: torch.Tensor) -> bool:
    p = local(p)
    return not (p.is_meta or is_fake(p)) and p.is_floating_point()


def _after_step(optimizer, args, kwargs) -> None:
    if isinstance(optimizer, GefenStep) and not isinstance(optimizer, LearnedState):
        _end_probe(optimizer)


@eager
def _end_probe(optimizer) -> None:
    """After a probed step that did not reach AdamW's: one that changed the parameters or the
    state is the subclass's own update, left alone; one that did neither (a step calling
    super().step() every few calls, say) showed nothing, and the next step is probed too."""
    (versions, state, sums), now = _probe_fingerprints[optimizer], _fingerprint(optimizer)
    if (versions, state) == now[:2] and (sums is None or torch.equal(sums, now[2])):
        return
    optimizer.__class__ = own_class(optimizer)
    _leave_alone(optimizer, "its step() (with the optimizer's own step hooks) changed the "
                            "parameters or the state without reaching AdamW's step through "
                            "super().step(): an update of its own", logging.WARNING)


def _probe(cls: type) -> type:
    """``cls`` with :class:`~gefen_compile.convert.GefenStep` right above AdamW: whether its
    ``step`` reaches AdamW's shows in its steps."""
    if cls not in _probes:
        _probes[cls] = type(cls.__name__, (cls, gefen_step_above(cls)),
                            {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                             "__reduce_ex__": _reduce_as_own_class})
    return _probes[cls]


def _reduce_as_own_class(optimizer, protocol: int) -> tuple:
    """A probed optimizer pickles (and deep-copies) as its own class, which pickle can look
    up (the probe class has its name but is not it), and with nothing of gefen_compile's
    (copyreg's reconstructor: object.__new__ of that class); the copy is probed anew at its
    next step."""
    return copyreg._reconstructor, (own_class(optimizer), object, None), optimizer.__getstate__()


def _end_probes(original: type) -> None:
    """Give the optimizers probed now whose class derives from ``original`` their own class
    back: unpatched, nothing converts them."""
    for optimizer in list(_probe_fingerprints):
        if issubclass(own_class(optimizer), original):
            if isinstance(optimizer, GefenStep) and not isinstance(optimizer, LearnedState):
                optimizer.__class__ = own_class(optimizer)
            del _probe_fingerprints[optimizer]


def _leave_alone(optimizer, why: str, level: int) -> None:
    optimizer._gefen_left_alone = True
    cls = own_class(optimizer)
    target = "GefenMuon" if issubclass(cls, Muon) else "Gefen"
    log.log(level, "left %s.%s as it is, not %s: %s", cls.__module__, cls.__qualname__, target,
            why)
