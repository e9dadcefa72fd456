"""``torch.optim.AdamW`` (or ``Adam``) -> Gefen, and ``torch.optim.Muon`` -> GefenMuon, in
place.

The optimizer object keeps its identity: its class becomes a subclass of both its own class and
:class:`~gefen_compile.Gefen` (so ``isinstance(opt, torch.optim.AdamW)`` stays true), its
``_init_group`` allocates nothing (AdamW's own math then runs on empty lists) and a step pre-hook
performs the Gefen update (Muon the same way: its ``_init_group`` gives empty lists and the hook
runs GefenMuon's update). That is what keeps working for every way a step reaches the object:
``opt.step()``, an LR scheduler's wrapper, and a ``torch.compile(opt.step)`` bound before the
conversion all call AdamW's ``step``, which runs the hooks (DESIGN "Facts about torch.compile").

A subclass whose own ``step`` calls ``super().step()`` gets one more class in its MRO, right
above AdamW, whose ``step`` is the Gefen update (and no hook: its wrapped ``step`` and AdamW's
would both run hooks, updating twice). The update then happens exactly where AdamW's would, after
whatever the subclass does first.

State AdamW (Muon) already holds is migrated into Gefen's (GefenMuon's) (migrate.py) and its
fp32 buffers released.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.optim import Adam, AdamW, Muon, Optimizer

from .hyperparameters import check_hyperparameters
from .learned_state import LearnedState
from .migrate import migrate_adamw_state, migrate_muon_state
from .muon import GefenMuon, check_matrix, check_muon_hyperparameters
from .optim import Gefen
from .state_checks import check_real
from .state import adamw_state_nbytes
from .variant import ROBUST, Variant, variant_named

log = logging.getLogger("gefen_compile")


@dataclass(frozen=True)
class Conversion:
    """What one :func:`convert` did; ``str()`` is the line the runner prints."""

    optimizer: str  # the optimizer's own class, module-qualified
    tensors: int
    parameters: int
    state_before: int  # bytes of optimizer state before the conversion
    state_after: int
    adamw_state: int  # bytes the original optimizer would allocate for these parameters
    target: str = "Gefen"  # or "GefenMuon"
    original: str = "AdamW"  # or "Muon"

    def __str__(self) -> str:
        pending = "" if self.state_after else (
            f" ({self.original} would allocate {_bytes(self.adamw_state)}; {self.target} about "
            "1 byte per parameter, at its first step)")
        return (f"converted {self.optimizer} to {self.target} ({self.tensors} tensors, "
                f"{self.parameters} parameters): optimizer state {_bytes(self.state_before)} -> "
                f"{_bytes(self.state_after)}{pending}")


# Called with every Conversion, after it is logged (the runner's report: report.py).
LISTENERS: list[Callable[[Conversion], None]] = []


class _Converted:
    """What a converted Adam/AdamW (Muon) adds to its own class (first in the MRO, then the
    AdamW class, then Gefen; or Muon's, then GefenMuon): no state of the original, and the Gefen
    update as the last step pre-hook."""

    def _init_group(self, group, params_with_grad, *args, **kwargs) -> bool:
        return False  # no complex parameters: the original update runs on empty lists

    def register_step_pre_hook(self, hook):
        handle = super().register_step_pre_hook(hook)
        # User hooks (gradient clipping, say) must see the gradients before the update.
        if self._gefen_hook is not None:
            self._optimizer_step_pre_hooks.move_to_end(self._gefen_hook)
        return handle

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # a fresh hook table after unpickling
        if getattr(self, "_gefen_hook", None) not in self._optimizer_step_pre_hooks:
            _install_update_hook(self)

    def __reduce_ex__(self, protocol: int) -> str | tuple[Any, ...]:
        cls = own_class(self)
        if cls in _CONVERTED_ORIGINALS:  # GefenAdamW and the like: pickled by their names
            return super().__reduce_ex__(protocol)
        # A subclass's converted class is made at its conversion, under no name pickle can look
        # up (GefenMyAdamW): rebuild it from the user's class, which has one.
        return _new_converted, (cls,), self.__getstate__()


class _UpdatedInHook(_Converted):
    """Above a class whose ``step`` is the original's: the update ran in the last step
    pre-hook, so the step itself only returns the closure's loss, which that hook handed on.
    The original's step, on empty lists, would read every group's lr, and a float lr read
    under torch.compile outside the update's graph stays a constant: the step compiled anew
    for each value of a schedule. (An optimizer converted within its step still runs the
    original's, once.)"""

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        return self._loss_of(closure)


class GefenAdamW(_UpdatedInHook, AdamW, Gefen):
    """A ``torch.optim.AdamW`` converted to Gefen by :func:`convert`."""


class GefenAdam(_UpdatedInHook, Adam, Gefen):
    """A ``torch.optim.Adam`` (decoupled weight decay, or none) converted to Gefen."""


class ConvertedMuon(_UpdatedInHook, Muon, GefenMuon):
    """A ``torch.optim.Muon`` converted to GefenMuon by :func:`convert`."""


class GefenStep:
    """Sits right above AdamW (or Adam, or Muon) in the MRO of a subclass that overrides
    ``step``: where that ``step`` calls ``super().step()``, Gefen's (GefenMuon's) update runs
    instead of the original's, once. An optimizer reaching it unconverted (the patch's probe,
    patch.py) is converted first."""

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        return convert(self)._update(closure)


class _GefenStepAdamW(GefenStep, AdamW):
    pass


class _GefenStepAdam(GefenStep, Adam):
    pass


class _GefenStepMuon(GefenStep, Muon):
    pass


# The optimizers convert() takes, most derived first: each with its converted class and its
# GefenStep class.
_ORIGINALS = ((AdamW, GefenAdamW, _GefenStepAdamW), (Adam, GefenAdam, _GefenStepAdam),
              (Muon, ConvertedMuon, _GefenStepMuon))


def original_base(cls: type) -> type:
    """The optimizer ``cls`` derives from among those convert() takes (AdamW, Adam, Muon)."""
    return next(base for base, _, _ in _ORIGINALS if issubclass(cls, base))


def gefen_step_above(cls: type) -> type:
    """The :class:`GefenStep` class that goes right above ``cls``'s AdamW (Adam, Muon) base."""
    return next(above for base, _, above in _ORIGINALS if issubclass(cls, base))


def overrides_step(cls: type) -> bool:
    """Whether ``cls`` (an AdamW, Adam or Muon subclass) defines a ``step`` of its own (torch
    wraps every class's step with its hooks, so compare what the wrappers wrap)."""
    return inspect.unwrap(cls.step) is not inspect.unwrap(original_base(cls).step)


_CONVERTED: dict[type, type] = {base: converted for base, converted, _ in _ORIGINALS}
_CONVERTED_ORIGINALS = frozenset(_CONVERTED)


# The variant of conversions that name none (the patch's, the runner's and the backend's), for
# Adam/AdamW and for Muon: the robust default, or what patch_adamw(variant=...) (patch_muon)
# chose.
_default_variant: dict[type, Variant] = {Adam: ROBUST, Muon: ROBUST}


def set_default_variant(name: str, where: str, original: type = Adam) -> None:
    """The variant conversions of ``original`` (Adam, covering AdamW, or Muon) use from now on
    when they name none."""
    _default_variant[original] = variant_named(name, where)


def convert(optimizer: Optimizer, *, variant: str | None = None) -> Optimizer:
    """Turn ``optimizer`` (a ``torch.optim.AdamW``, or an ``Adam`` with decoupled weight decay or
    ``weight_decay=0``) into Gefen in place, or a ``torch.optim.Muon`` into GefenMuon, and
    return it. ``variant``: as for ``Gefen`` (None: the robust default, or the one
    ``patch_adamw(variant=...)`` chose).

    Before its first step nothing is allocated; after it, AdamW's state is migrated into Gefen's
    (Muon's momentum buffers quantised into GefenMuon's) and its fp32 buffers are released. Param groups, hooks, LR schedulers and references to the
    optimizer keep working. Converting a converted optimizer does nothing.

    A subclass that overrides ``step`` gets Gefen's update where its ``step`` calls
    ``super().step()``; one whose ``step`` never does keeps its own update and no Gefen update
    (the patch leaves such subclasses alone: see patch.py).
    """
    if "_gefen_hook" in vars(optimizer) or (
        isinstance(optimizer, LearnedState) and not isinstance(optimizer, _Converted)
    ):
        return optimizer
    check_convertible(optimizer)
    muon = isinstance(optimizer, Muon)
    chosen = (_default_variant[Muon if muon else Adam] if variant is None
              else variant_named(variant, "convert"))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    before = _state_bytes(optimizer)
    full = sum(p.nbytes if muon else adamw_state_nbytes(p) for p in params)
    if not isinstance(optimizer, _Converted):
        optimizer.__class__ = _converted_class(own_class(optimizer))
    optimizer._patch_step_function()  # a class never instantiated has an unhooked step
    optimizer.variant = chosen
    optimizer._set_codebook(None)
    optimizer._buckets, optimizer._index = None, {}
    _install_update_hook(optimizer)
    (migrate_muon_state if muon else migrate_adamw_state)(optimizer)
    conversion = Conversion(_converted_from(optimizer), len(params),
                            sum(p.numel() for p in params), before, _state_bytes(optimizer),
                            full, *(("GefenMuon", "Muon") if muon else ()))
    log.info("%s", conversion)
    for listener in LISTENERS:
        listener(conversion)
    return optimizer


def is_convertible(optimizer: Optimizer) -> bool:
    """Whether :func:`convert` would accept ``optimizer`` (exactly AdamW, Adam without
    coupled weight decay, or Muon, with no option Gefen refuses)."""
    return type(optimizer) in _CONVERTED_ORIGINALS and refusal(optimizer) is None


def refusal(optimizer: Optimizer) -> Exception | None:
    """The error :func:`convert` would raise for ``optimizer`` (an option Gefen refuses), or
    None."""
    try:
        check_convertible(optimizer)
    except (TypeError, ValueError, NotImplementedError) as error:
        return error
    return None


def check_convertible(optimizer: Optimizer) -> None:
    """Raise the error :func:`convert` would raise for ``optimizer``, if any."""
    if isinstance(optimizer, Muon):
        for i, group in enumerate(optimizer.param_groups):
            where = f"convert: param group {i} of {_converted_from(optimizer)}"
            check_muon_hyperparameters(group, where)
            for j, p in enumerate(group["params"]):
                check_matrix(p, f"parameter {j} of param group {i}")
        return
    if not isinstance(optimizer, Adam):
        raise TypeError(
            f"convert: {type(optimizer).__name__} is not torch.optim.AdamW, torch.optim.Adam or "
            "torch.optim.Muon; Gefen replaces AdamW's update (GefenMuon Muon's) only: build "
            "gefen_compile.Gefen directly instead"
        )
    for i, group in enumerate(optimizer.param_groups):
        where = f"convert: param group {i} of {_converted_from(optimizer)}"
        if group.get("fused") and group.get("foreach"):
            raise ValueError(f"{where}: fused and foreach cannot both be True")
        check_hyperparameters(group, where=where)
        for j, p in enumerate(group["params"]):
            check_real(p, f"parameter {j} of param group {i} of {_converted_from(optimizer)}")


def _converted_class(cls: type) -> type:
    if cls not in _CONVERTED:  # a user's subclass: convert it the same way, named after it
        base = _CONVERTED[original_base(cls)]
        gefen = GefenMuon if issubclass(cls, Muon) else Gefen
        bases = ((_Converted, cls, gefen_step_above(cls), gefen) if overrides_step(cls)
                 else (_UpdatedInHook, cls, gefen))
        _CONVERTED[cls] = type(f"Gefen{cls.__name__}", bases,
                               {"__doc__": base.__doc__, "__module__": cls.__module__})
    return _CONVERTED[cls]


def _new_converted(cls: type) -> Optimizer:
    """An empty converted ``cls`` (a user's AdamW, Adam or Muon subclass), for unpickling: its
    state then goes to ``__setstate__``, which installs the update."""
    converted = _converted_class(cls)
    return converted.__new__(converted)


def own_class(optimizer: Optimizer) -> type:
    """The optimizer's class before any conversion (or probe): torch.optim.AdamW, say."""
    return next(c for c in type(optimizer).__mro__
                if not issubclass(c, (_Converted, LearnedState, GefenStep)))


def _converted_from(optimizer: Optimizer) -> str:
    cls = own_class(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def _install_update_hook(optimizer: Optimizer) -> None:
    if isinstance(optimizer, GefenStep):  # the update runs in GefenStep.step, not in a hook
        optimizer._gefen_hook = None
        return
    # Optimizer's own registration: the override above moves this very hook to the end.
    optimizer._gefen_hook = Optimizer.register_step_pre_hook(optimizer, _gefen_update).id


def _gefen_update(optimizer: Gefen, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The step pre-hook of a converted optimizer: the Gefen update of every group. The
    closure, if any, is evaluated first, and the step returns its loss (_UpdatedInHook's, or
    AdamW's on empty lists where the optimizer was converted within it)."""
    closure = closure_of(args, kwargs)
    loss = optimizer._update(closure)
    if closure is None:
        return None

    def evaluated() -> Any:  # the step still returns the loss, and the model runs once
        return loss

    return with_closure(args, kwargs, evaluated)


def closure_of(args: tuple, kwargs: dict) -> Callable[[], Any] | None:
    """The closure in a step pre-hook's arguments (``args[0]``: the optimizer), if any."""
    return args[1] if len(args) > 1 else kwargs.get("closure")


def with_closure(args: tuple, kwargs: dict, closure: Callable[[], Any]) -> tuple[tuple, dict]:
    """A step pre-hook's arguments with ``closure`` in place of theirs."""
    if len(args) > 1:
        return (args[0], closure, *args[2:]), kwargs
    return args, {**kwargs, "closure": closure}


def _state_bytes(optimizer: Optimizer) -> int:
    total = sum(
        t.nbytes for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor)
    )
    codebook = getattr(optimizer, "codebook", None)
    return total + (codebook.nbytes if codebook is not None else 0)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
