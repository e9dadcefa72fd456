"""What Gefen and GefenMuon share: a first moment (Gefen's) or momentum (GefenMuon's) stored as
uint8 codes into one 256-entry codebook times a magnitude per block, with the codebook and every
parameter's period learned from first gradients (GEFEN_SPEC "Period inference", "Codebook",
and the robust variant's rules in variant.py)."""

from __future__ import annotations

import operator
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor

from . import distributed
from .eager import eager
from .codebook import NUM_BINS, NearestCode, is_thin, learn_codebook
from .first_step import first_histogram, read_first_gradients, shard_period
from .state_checks import codebook_problem
from .variant import ROBUST, Variant, saved_variant


def located(optimizer: torch.optim.Optimizer, p: Tensor) -> str:
    """'parameter i of param group j' (its name, when known), for error messages."""
    for gi, group in enumerate(optimizer.param_groups):
        for pi, q in enumerate(group["params"]):
            if q is p:
                return place(optimizer.param_groups, gi, pi)
    raise KeyError("parameter not in this optimizer")


def place(groups: list[dict[str, Any]], gi: int, pi: int) -> str:
    """'parameter pi of param group gi', with its name where the group has names."""
    group = groups[gi]
    name = f" ({group['param_names'][pi]})" if "param_names" in group else ""
    return f"parameter {pi} of param group {gi}{name}"


def _unchanged(value: Any, before: Any) -> bool:
    """Whether a group's value is what it was (``before``: its :func:`_kept` copy): the same
    object, an equal Python number or string, or a sequence of such items. Other objects
    (tensors, arrays) are compared by identity: comparing them reads their elements."""
    if value is before:
        return True
    kind = type(value)
    if kind in _PLAIN:
        return kind is type(before) and value == before
    return ((kind is tuple or kind is list) and type(before) is tuple
            and len(value) == len(before) and all(map(_unchanged, value, before)))


def _kept(value: Any) -> Any:
    """``value`` as :func:`_unchanged` compares it later: a list copied (as a tuple), so
    that one edited in place is seen to change."""
    return tuple(value) if type(value) is list else value


_PLAIN = frozenset({float, int, bool, str})


def _only_a_new_lr(changed: list[tuple[str, Any]]) -> bool:
    """Whether the only value changed (key, value) is "lr", to a Python float >= 0: a
    schedule's, at every step, and all that the whole check would read of it."""
    return (len(changed) == 1 and changed[0][0] == "lr" and type(changed[0][1]) is float
            and changed[0][1] >= 0)


class NonFiniteFirstGradient(ValueError):
    """A first gradient with inf or nan values: nothing is learned or changed."""

    def __init__(self, owner: str, where: str):
        super().__init__(
            f"{owner}: the first gradient of {where} has inf or nan values, on this rank or "
            "another that holds a shard of it (or, in float64, values beyond float32's range, "
            f"where the codebook is learned); {owner} reads periods and its codebook from first "
            "gradients, so skip this step (as torch.amp.GradScaler does) and call step() again "
            "with finite gradients"
        )


class LearnedState:
    """Mixin of a ``torch.optim.Optimizer`` with ``variant``, ``codebook`` and ``_nearest``:
    what the two optimizers do alike, from the first step to their checkpoints. Each provides
    ``_update`` (the step), ``_local_saved`` (a saved state_dict in the single-process layout),
    ``_saved`` (its state_dict's layout from torch's), ``_load_original`` (the state_dict of
    the optimizer it replaces), ``_check_saved_groups``
    (a ValueError for saved param groups it cannot step with), ``_check_entry`` and
    ``_check_group`` (its constructor's check of a group's values; ``edited=True``: of values
    set since, reading no tensor) and ``_check_param`` (of a parameter)."""

    _check_group: Callable[..., None]
    _check_param: Callable[[Tensor, str], None]

    _name = "Gefen"  # in error messages

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimizer step; ``closure`` (re-evaluating the loss) is run first, with grad."""
        return self._update(closure)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as the original optimizer's ``add_param_group``; its values and its
        parameters (``_check_param``) are checked."""
        index = len(self.param_groups)
        self._check_group({**self.defaults, **param_group}, f"param group {index}")
        params = self._listed_params(param_group, self._check_param)
        super().add_param_group({**param_group, "params": params})
        self._buckets = None  # the group table changed
        checked = self.__dict__.setdefault("_checked_groups", [])
        if len(checked) == index:  # else groups were appended by hand: the step checks them
            checked.append(self._checked_values(self.param_groups[index]))

    def _checked_values(self, group: dict[str, Any]) -> tuple:
        """The values of ``group`` that the constructor checks, as _unchanged compares them."""
        return tuple(map(_kept, map(group.get, self.defaults)))

    def _check_edited_groups(self) -> None:
        """Check again, as the constructor did, every group whose values changed since they
        were checked: set by hand, beta1 = 1 would NaN every parameter where AdamW's step
        fails, and an option Gefen refuses (amsgrad) would be ignored. A tensor (any value
        but Python's numbers and strings, and sequences of them) is compared by identity and
        never read on the host (a scheduler's in-place update, a tensor set in its place).
        Under torch.compile nothing is compared (it would make a float lr a constant of the
        graph)."""
        if torch.compiler.is_compiling():
            return
        keys = tuple(self.defaults)
        checked = self.__dict__.setdefault("_checked_groups", [])
        for i, group in enumerate(self.param_groups):
            values = tuple(map(group.get, keys))
            if i < len(checked):
                before = checked[i]
                if all(map(operator.is_, values, before)):  # the usual step
                    continue
                changed = [(k, v) for k, v, was in zip(keys, values, before)
                           if v is not was and not _unchanged(v, was)]
                if changed and not _only_a_new_lr(changed):
                    self._check_group(group, f"param group {i}", edited=True)
            else:
                self._check_group(group, f"param group {i}", edited=True)
            # replaced, or appended; lists copied, so that one edited in place is seen
            checked[i:i + 1] = [tuple(map(_kept, values)) if list in map(type, values) else values]

    @staticmethod
    def _loss_of(closure: Callable[[], float] | None) -> float | None:
        """The closure's loss, evaluated with grad (None without a closure)."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _listed_params(self, param_group: dict[str, Any],
                       check: Callable[[Tensor, str], None]) -> list:
        """A new group's parameters as a list, each tensor passed to ``check`` with its place
        ("parameter i of param group j"). A set is refused, as torch refuses it: its order
        follows id() hashes, so state_dict indices would reach other parameters on resume."""
        index = len(self.param_groups)
        params = param_group["params"]
        if isinstance(params, (set, frozenset)):
            raise TypeError(
                f"{self._name}: param group {index} holds its parameters in a set, whose order "
                "changes between runs (a checkpoint's state would reach other parameters on "
                "resume); pass them in a list, as torch.optim optimizers require"
            )
        params = [params] if isinstance(params, Tensor) else list(params)
        for i, p in enumerate(params):
            name = f" ({p[0]})" if isinstance(p, tuple) else ""
            p = p[1] if isinstance(p, tuple) else p  # named parameters come as (name, tensor)
            if isinstance(p, Tensor):
                check(p, f"parameter {i} of param group {index}{name}")
        return params

    def _set_codebook(self, codebook: Tensor | None, histogram: Tensor | None = None) -> None:
        """``histogram``: the counts a provisional codebook was learned from (see
        :meth:`_learn_codebook`); None for a final one."""
        self.codebook = codebook
        self._nearest = None if codebook is None else NearestCode(codebook)
        self._codebook_histogram = histogram

    def _learn_codebook(self, params: list[Tensor], grads: list[Tensor], periods: list[int],
                        negate: list[bool]) -> None:
        """The codebook, from the first gradients (or migrated moments; or, while the codebook
        is provisional, a step's gradients: _relearn_provisional) ``grads`` of ``params`` cut
        into rows by ``periods``, while there is none; and, where the variant relearns thin
        codebooks, again while the one there is provisional: learned from too few values for
        256 distinct entries (is_thin), as when only a scale or a bias had a gradient at the
        first step. Then it is learned from every histogram so far, and the codes of the
        parameters that have state are mapped to the new entries nearest their old ones. Once
        not thin, it is final. A no-op when the codebook is final."""
        if self.codebook is not None and self._codebook_histogram is None:
            return
        counts = first_histogram(params, grads, periods, negate, self.variant)
        if counts is None:
            return
        if self._codebook_histogram is not None:
            counts = counts + self._codebook_histogram
        if not counts.any():
            return
        codebook = learn_codebook(counts, self.variant)
        if self.codebook is not None:
            self._recode(codebook)
        provisional = self.variant.relearns_thin_codebook and is_thin(counts, self.variant)
        self._set_codebook(codebook, counts if provisional else None)

    @eager  # host work: the histogram's round trip, the codebook
    def _relearn_provisional(self, stateful: list[tuple[dict, Tensor, Tensor]]) -> None:
        """While the codebook is provisional (thin, robust variant), learn it again from this
        step's gradients of the parameters that had state before it (``stateful``: group,
        parameter, gradient; new parameters learned from theirs first), on top of every
        histogram so far, stored codes following: where every parameter had state from the
        first step (a small model), it would otherwise stay thin for good. Nothing is learned
        at a step with a gradient that is not finite or not of its parameter's dtype, shape,
        layout and device (the step refuses it), at torch.distributed.checkpoint's
        zero-gradient step, while a CUDA graph is captured (reading the histogram would sync),
        or from sharded parameters (their ranks would have to agree on it: those relearn only
        as parameters get state)."""
        stateful = [(group, p, g) for group, p, g in stateful if not distributed.is_sharded(p)]
        grads = [g for _, _, g in stateful]
        if (not stateful or distributed.is_state_materialising_step(self.param_groups, grads)
                or torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
                or any((g.dtype, g.shape, g.layout, g.device)
                       != (p.dtype, p.shape, torch.strided, p.device) for _, p, g in stateful)
                or not all(bool(g.isfinite().all()) for g in grads)):
            return
        self._learn_codebook([p for _, p, _ in stateful], grads,
                             [self.state[p]["period"] for _, p, _ in stateful],
                             [bool(group.get("maximize", False)) for group, _, _ in stateful])

    @torch.no_grad()
    def _recode(self, codebook: Tensor) -> None:
        """Every stored code, mapped from its entry of the current codebook to the nearest entry
        of ``codebook``; magnitudes stay (the pinned -1, 0 and +1 map to themselves)."""
        remap = NearestCode(codebook)(self.codebook).to(torch.uint8)
        for entry in self.state.values():
            codes = entry.get("codes")
            if codes is not None:
                codes.copy_(remap.to(codes.device)[codes.long()])

    def _params(self) -> list[Tensor]:
        """Every parameter, in state_dict index order."""
        return [p for group in self.param_groups for p in group["params"]]

    def _locate(self, p: Tensor) -> str:
        return located(self, p)

    def _learn(self, fresh: list[tuple[dict, Tensor, Tensor]]) -> list[tuple[dict, Tensor, Tensor]]:
        """Periods (and, at the first step, the codebook) of parameters seen for the first
        time, from their first gradients (``fresh``: group, parameter, local gradient): each
        learning parameter's state becomes ``{"period": period}``, and those are returned.
        Robust variant: those whose gradient is all zero (on every rank) get AdamW's weight
        decay only (as Muon's update of a zero gradient is), and wait."""
        grads = [g for _, _, g in fresh]
        periods, finite, local_nonzero = read_first_gradients(grads, self.variant)
        finite, nonzero, informed = distributed.agreed_first_gradients(
            [p for _, p, _ in fresh], finite, local_nonzero, periods)
        # A shard's all-zero gradient (an embedding's unused rows) says nothing of its
        # parameter's structure, and its inferred period 1 would cost ~4 bytes per element.
        periods = [shard_period(known, tuple(g.shape), self.variant) if here != anywhere
                   else period
                   for period, known, here, anywhere, g in zip(periods, informed, local_nonzero,
                                                                nonzero, grads)]
        for (_, p, _), ok in zip(fresh, finite):
            if not ok:
                raise NonFiniteFirstGradient(self._name, self._locate(p))
        if self.variant.zero_gradients_wait:
            decay_only([f for f, learn in zip(fresh, nonzero) if not learn])
            fresh = [f for f, learn in zip(fresh, nonzero) if learn]
            periods = [period for period, learn in zip(periods, nonzero) if learn]
            if not fresh:
                return []
        # AdamW reads maximize for its truth only (None, 1, a tensor are all taken).
        negate = [bool(group.get("maximize", False)) for group, _, _ in fresh]
        self._learn_codebook([p for _, p, _ in fresh], [g for _, _, g in fresh], periods, negate)
        for (_, p, _), period in zip(fresh, periods):
            self.state[p] = {"period": period}
        return fresh

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this optimizer's ``state_dict()``, its floating moments cast to their
        parameters' dtypes as ``torch.optim.Optimizer`` casts AdamW's (uint8 codes stay uint8,
        where torch would cast them too), after checking the codebook and every entry; or a
        state_dict of the optimizer it replaces (no codebook), whose moments are migrated."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        state_dict = self._local_saved(state_dict)
        self._check_saved_groups(state_dict["param_groups"])
        if "codebook" not in state_dict:
            # The load hooks run here, once, around the migration: not again in torch's load.
            with self._hooks_held("_optimizer_load_state_dict_pre_hooks",
                                  "_optimizer_load_state_dict_post_hooks"):
                self._load_original(state_dict)
        else:
            self._load_own(state_dict)
        self._checked_groups = [self._checked_values(g) for g in self.param_groups]
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    @contextmanager
    def _hooks_held(self, *tables: str) -> Iterator[list[OrderedDict]]:
        """No hooks in the named hook tables (``_optimizer_load_state_dict_pre_hooks``, ...)
        while torch.optim.Optimizer's own method runs: they run around Gefen's work instead.
        Yields the held tables."""
        held = [getattr(self, table) for table in tables]
        for table in tables:
            setattr(self, table, OrderedDict())
        try:
            yield held
        finally:
            for table, hooks in zip(tables, held):
                setattr(self, table, hooks)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state_dict, in the layout of the class's ``_saved``. Its post-hooks
        see it as returned (torch's would run before the codebook and the markers join it)."""
        for p in self._params():
            codes = (self.state.get(p) or {}).get("codes")
            if codes is not None and codes.numel() != distributed.local(p).numel():
                raise ValueError(
                    f"{self._name}.state_dict: {self._locate(p)} has {p.numel()} elements, but "
                    f"its state was built for {codes.numel()} (the parameter was resized after "
                    "its first step: p.data = ...), so its codes have no shape to be saved in; "
                    "build the optimizer again after changing the model, or save before")
        with self._hooks_held("_optimizer_state_dict_post_hooks") as (post_hooks,):
            state_dict = self._saved(super().state_dict())
        for hook in post_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        return state_dict

    def _load_own(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict this optimizer's class saved (in the single-process layout)."""
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(
                f"{self._name}.load_state_dict: the saved param groups do not match this "
                "optimizer's (number of groups, or parameters per group); build the optimizer "
                "over the same parameters, in the same groups, before loading"
            )
        codebook = state_dict["codebook"]  # None: saved before any gradient had elements
        variant = saved_variant(state_dict)
        if codebook is None and any("codes" in e for e in state_dict["state"].values()):
            problem = "is None while entries hold codes, which index into it"
        else:
            problem = None if codebook is None else codebook_problem(codebook)
        if problem:
            raise ValueError(f"{self._name}.load_state_dict: the saved codebook {problem}; load "
                             f"the state_dict that {self._name}.state_dict() returned, unchanged")
        histogram = state_dict.get(HISTOGRAM)
        if histogram is not None and not _is_histogram(histogram, codebook, variant):
            raise ValueError(f"{self._name}.load_state_dict: the saved {HISTOGRAM} is not the "
                             f"{NUM_BINS} counts of a provisional codebook; load the state_dict "
                             f"that {self._name}.state_dict() returned, unchanged")
        # Every entry is checked (against the saved variant's layout) before anything is replaced.
        state, groups = self._checked_saved_state(state_dict, saved_groups, variant)
        self.__setstate__({"state": state, "param_groups": groups, "variant": variant})
        self._set_codebook(None if codebook is None else codebook.detach().to("cpu", torch.float32),
                           None if histogram is None else histogram.detach().to("cpu").clone())

    def _with_codebook(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with the codebook, the variant's name and, while the codebook is
        provisional, the histogram it was learned from (``"codebook_histogram"``)."""
        state_dict["codebook"] = self.codebook
        state_dict["variant"] = self.variant.name
        if self._codebook_histogram is not None:
            state_dict[HISTOGRAM] = self._codebook_histogram
        return state_dict

    def _checked_saved_state(self, state_dict: dict[str, Any], saved_groups: list[dict],
                             variant: Variant) -> tuple:
        """The state (keyed by parameter, on their devices) and param groups of a loaded
        ``state_dict``, every entry checked against its parameter."""
        state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        groups = []
        for saved, live in zip(saved_groups, self.param_groups):
            for key, param in zip(saved["params"], live["params"]):
                if state_dict["state"].get(key):  # an empty entry: no state, as AdamW saves it
                    entry = _in_dtype_of(state_dict["state"][key], distributed.local(param))
                    self._check_entry(entry, param,
                                      f"{self._name}.load_state_dict: the saved state of",
                                      f"load a state_dict saved by {self._name} over these "
                                      "parameters, in the same order and shapes", variant)
                    state[param] = _moved(entry, param, saved.get("capturable", False))
            group = deepcopy({k: v for k, v in saved.items() if k != "params"})
            group["params"] = live["params"]
            if "param_names" in live:
                group.setdefault("param_names", live["param_names"])
            groups.append(group)
        return state, groups

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "codebook": self.codebook, "variant": self.variant,
                HISTOGRAM: self._codebook_histogram}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        codebook = state.pop("codebook", getattr(self, "codebook", None))
        histogram = state.pop(HISTOGRAM, getattr(self, "_codebook_histogram", None))
        self.variant = state.pop("variant", getattr(self, "variant", ROBUST))
        super().__setstate__(state)
        self._set_codebook(codebook, histogram)
        self._buckets, self._index = None, {}  # rebuilt from the per-parameter state


HISTOGRAM = distributed.HISTOGRAM


def _is_histogram(value: Any, codebook: Tensor | None, variant: Variant) -> bool:
    """Whether ``value`` can be the histogram of the provisional ``codebook``."""
    return (isinstance(value, Tensor) and value.shape == (NUM_BINS,)
            and value.dtype == torch.int64 and codebook is not None
            and variant.relearns_thin_codebook and bool((value >= 0).all())
            and bool(value.any()) and is_thin(value, variant))


def _in_dtype_of(entry: dict[str, Any], param: Tensor) -> dict[str, Any]:
    """``entry`` with its floating moments (magnitude, vmean) in ``param``'s dtype, as
    torch.optim.Optimizer.load_state_dict casts AdamW's: a checkpoint saved before the model
    was cast (to bf16, say) resumes it. Codes, step and period stay as saved."""
    return {key: value.to(param.dtype)
            if key in ("magnitude", "vmean") and isinstance(value, Tensor)
            and value.is_floating_point() and param.is_floating_point() else value
            for key, value in entry.items()}


def _moved(entry: dict[str, Any], param: Tensor, capturable: bool) -> dict[str, Any]:
    """A copy of a saved per-parameter state on ``param``'s device (its local shard's),
    dtypes unchanged (a step counter stays on CPU unless capturable, as AdamW keeps it)."""
    device = distributed.local(param).device
    moved = {}
    for key, value in entry.items():
        if isinstance(value, Tensor):
            value = value.to("cpu" if key == "step" and not capturable else device, copy=True)
        moved[key] = value
    return moved


def decay_only(waiting: list[tuple[dict, Tensor, Tensor]]) -> None:
    """The step of a zero gradient, for parameters whose state waits for a non-zero one:
    decoupled weight decay only (p *= 1 - lr * weight_decay)."""
    for group, p, _ in waiting:
        if group["weight_decay"]:
            distributed.local(p).mul_(1 - group["lr"] * group["weight_decay"])
