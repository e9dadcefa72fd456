"""AdamW state -> Gefen state for the updates a graph was matched with.

The optimizer that owns each matched update is found by tensor identity: an exact
``torch.optim.AdamW`` (or ``Adam``; not a subclass, whose ``step`` may be an update of its own)
that holds the parameter and whose state for it *is* the graph's two moments (the graph's
leaves are the optimizer's own tensors: get_attr values, or example inputs for placeholders).
That is the rule that tells the optimizer's own step from another update over the same
parameters (RAdam's, a hand-written one) with an AdamW that never stepped beside it: an
update over tensors that are not an AdamW's state is not that AdamW's step, whatever its
dataflow. (dynamo allocates AdamW's state while tracing ``opt.step``, so a captured step always
reads it.)

:func:`plan_state` checks everything first and changes nothing (a refusal leaves the
optimizer as it was); :func:`convert_owners` then converts each owner in place (convert.py):
state it has stepped with is migrated, and parameters still without state get their periods
(and, first of all, the codebook) from the example gradients, exactly as Gefen's first step
would. The graph itself is returned unchanged: lower_fused.py replaces its AdamW math by the
Gefen step over the new state.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node
from torch.optim import Adam, AdamW

from ..convert import _default_variant, convert, is_convertible, own_class
from ..learned_state import NonFiniteFirstGradient, located
from ..optim import Gefen
from .dataflow import attribute
from .match_adamw import AdamWUpdate, MatchReport, NotRewritten


@dataclass
class StatePlan:
    """The owner of every matched update (checked, not yet converted), with the updates'
    leaf values."""

    owners: list[tuple[torch.optim.Optimizer, list[AdamWUpdate]]]
    values: dict[Node, torch.Tensor]


@dataclass
class StateReport:
    """The optimizers that own the matched updates, each with its updates, now Gefen.

    The AdamW state entries dynamo's guards read (moments, and the step of a parameter still
    without Gefen state) stay in ``optimizer.state`` (beside the Gefen state, unused) until
    :meth:`release`: dynamo builds the guards of the graph being compiled after the backend
    returns."""

    owners: list[tuple[Gefen, list[AdamWUpdate]]] = field(default_factory=list)
    values: dict[Node, torch.Tensor] = field(default_factory=dict)  # leaf -> its tensor
    kept: list[tuple[dict, tuple[str, ...]]] = field(default_factory=list)  # entry, AdamW keys

    def release(self) -> None:
        """Drop the AdamW entries kept for dynamo's guards (their memory goes with them), and
        every reference the report holds to tensors and optimizers: a compiled graph that keeps
        the report (dynamo's wrapper of a backend's result copies its attributes) must not
        keep the moments, first gradients, parameters or optimizer alive."""
        for entry, keys in self.kept:
            for key in keys:
                entry.pop(key, None)
        self.kept.clear()
        self.values.clear()
        self.owners.clear()

    def __str__(self) -> str:
        return "\n".join(
            f"{type(opt).__name__} at {id(opt):#x}: {len(updates)} parameter(s) now in Gefen "
            f"state" for opt, updates in self.owners
        ) or "no optimizer converted"


def rewrite_state(
    gm: GraphModule, matches: MatchReport, example_inputs=None, *, runs_once: bool = False
) -> tuple[GraphModule, StateReport]:
    """Convert the owner of every matched update to Gefen (see the module docstring); raises
    :class:`NotRewritten` (a ValueError), changing nothing, where that cannot be done."""
    return gm, convert_owners(plan_state(gm, matches, example_inputs, runs_once=runs_once))


def plan_state(gm: GraphModule, matches: MatchReport, example_inputs=None, *,
               runs_once: bool = False) -> StatePlan:
    """The owners of the matched updates, after every check; raises :class:`NotRewritten`.
    ``runs_once``: the rewritten graph runs once, with these inputs (see rewrite_adamw_steps)."""
    values = leaf_values(gm, example_inputs)
    by_owner: dict[int, tuple[torch.optim.Optimizer, list[AdamWUpdate]]] = {}
    for update, owner in zip(matches.updates, _owners(matches, values)):
        if owner is None:
            raise NotRewritten(
                f"the AdamW-like update of graph node {update.param.name!r} is not the step of a "
                "live torch.optim.AdamW (or Adam) over that tensor: its moments are not such an "
                "optimizer's state tensors (another optimizer's update, or one over tensors of "
                "its own); the passes rewrite an exact AdamW's step, so pass the graph the "
                "optimizer's own parameters and state (as example_inputs for placeholders)",
                quiet=True,
            )
        by_owner.setdefault(id(owner), (owner, []))[1].append(update)
    plan = StatePlan(list(by_owner.values()), values)
    for owner, updates in plan.owners:
        _check_owner(owner, updates, values, runs_once)
    return plan


def convert_owners(plan: StatePlan) -> StateReport:
    """Convert every owner of ``plan`` to Gefen, keeping the AdamW entries dynamo's guards
    read until ``report.release()``."""
    values = plan.values
    report = StateReport(values=values)
    for owner, updates in plan.owners:
        params = [values[u.param] for u in updates]
        adamw = {p: dict(owner.state.get(p, {})) for p in params}
        # A waiting parameter's first step is its weight decay only (learned_state.py), in place.
        with torch.no_grad():
            gefen = convert(owner)
            fresh = [(p, values.get(u.grad)) for u, p in zip(updates, params)
                     if not gefen.state.get(p)]
            if fresh:
                gefen._initialise([(_group_of(gefen, p), p, g) for p, g in fresh])
        if gefen._buckets is None:
            gefen._buckets = gefen._build_buckets({})
        for p, entry in adamw.items():
            state = gefen.state[p]
            added = {k: v for k, v in entry.items() if k not in state}
            state.update(added)
            report.kept.append((state, tuple(added)))
        report.owners.append((gefen, updates))
    return report
def leaf_values(gm: GraphModule, example_inputs=None) -> dict[Node, torch.Tensor]:
    """The tensor each placeholder (from ``example_inputs``) and get_attr node stands for."""
    values = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, example_inputs or ()):
        if isinstance(example, torch.Tensor):
            values[node] = example
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = attribute(gm, node.target)
            if isinstance(value, torch.Tensor):
                values[node] = value
    return values


def owners_of(gm: GraphModule, matches: MatchReport,
              example_inputs=None) -> list[torch.optim.Optimizer]:
    """The live AdamW (Adam) optimizers whose steps the matched updates are."""
    owners = _owners(matches, leaf_values(gm, example_inputs))
    return list({id(o): o for o in owners if o is not None}.values())


def _owners(matches: MatchReport, values) -> list[torch.optim.Optimizer | None]:
    """The owner of each matched update (None: no live AdamW's)."""
    optimizers = _live_adam_optimizers()
    return [next((o for o in optimizers if _owns(o, update, values)), None)
            for update in matches.updates]


def _live_adam_optimizers() -> list[torch.optim.Optimizer]:
    # Compile-time only: the graph names tensors, and only the heap knows who holds them.
    # Exactly AdamW or Adam (also once converted): as the backend's step hook, no subclass.
    return [o for o in gc.get_objects()
            if issubclass(type(o), Adam) and own_class(o) in (AdamW, Adam)]


def _owns(optimizer: torch.optim.Optimizer, update: AdamWUpdate, values) -> bool:
    param, exp_avg, exp_avg_sq = (values.get(n) for n in (update.param, update.exp_avg,
                                                            update.exp_avg_sq))
    if param is None or exp_avg is None or exp_avg_sq is None:
        return False
    if not any(p is param for g in optimizer.param_groups for p in g["params"]):
        return False
    state = optimizer.state.get(param) or {}
    return state.get("exp_avg") is exp_avg and state.get("exp_avg_sq") is exp_avg_sq


def _check_owner(owner, updates: list[AdamWUpdate], values, runs_once: bool) -> None:
    """Raise NotRewritten where converting ``owner`` and lowering its updates would not give
    Gefen's steps."""
    if not isinstance(owner, Gefen) and not is_convertible(owner):
        raise NotRewritten(
            f"{type(owner).__name__} at {id(owner):#x} has an option Gefen does not support "
            "(amsgrad, or Adam's coupled weight decay), so it stays as it is"
        )
    variant = owner.variant if isinstance(owner, Gefen) else _default_variant[Adam]
    for update in updates:
        param = values[update.param]
        if _has_gefen_state(owner, param, variant):
            continue
        grad = values.get(update.grad)
        _check_real(update, grad)
        # Before anything is converted (the first step would refuse it after).
        if not bool(torch.isfinite(grad.float()).all()):
            raise NonFiniteFirstGradient(
                "Gefen", f"{located(owner, param)} of {type(owner).__name__} (graph node "
                f"{update.param.name!r})")
        if runs_once or not variant.zero_gradients_wait or not grad.numel() or grad.any():
            continue
        raise NotRewritten(
            f"the example gradient of graph node {update.param.name!r} is all zero: Gefen "
            "starts that parameter's state at its first non-zero gradient, host work that a "
            "graph run again and again cannot do; capture the step with a non-zero gradient "
            "for every parameter (or step the optimizer once first)"
        )
    # Gefen's fused step reads the groups' values; rewriting a graph that reads them as inputs
    # made a backend=gefen, dynamic=True compile retrace (dynamo's SpeculationLogDivergence).
    lrs = [g["lr"] for g in owner.param_groups if isinstance(g["lr"], torch.Tensor)]
    for update in updates:
        inputs = [x for x in update.hyper if x.op == "placeholder"
                  and not any(values.get(x) is lr for lr in lrs)]
        if inputs:
            raise NotRewritten(
                f"the AdamW update of graph node {update.param.name!r} reads graph input "
                f"{inputs[0].name!r} (a hyperparameter passed as a tensor, say), which Gefen's "
                "fused step would replace by the optimizer's group value at rewrite time; pass "
                "float hyperparameters (or the group's own tensor lr): torch.compile(..., "
                "dynamic=True) passes them as tensors, so compile the step without it"
            )


def _has_gefen_state(owner, param: torch.Tensor, variant) -> bool:
    """Whether ``param`` has Gefen state after converting ``owner`` (migrate.py's rule: AdamW
    state that stepped, robust variant: with a non-zero gradient seen, is migrated)."""
    state = owner.state.get(param) or {}
    if "codes" in state:
        return True
    if "exp_avg_sq" not in state or not float(state.get("step", 0)):
        return False
    return not variant.zero_gradients_wait or bool(state["exp_avg_sq"].any())


def _group_of(optimizer: Gefen, param: torch.Tensor) -> dict:
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


def _check_real(update: AdamWUpdate, grad) -> None:
    if grad is None or isinstance(grad, torch._subclasses.FakeTensor) or grad.is_meta:
        raise ValueError(
            f"gefen_compile: the gradient of graph node {update.param.name!r} has no real "
            "value, and Gefen's first step reads periods and its codebook from first "
            "gradients; pass the real example_inputs (as a torch.compile backend gets them)"
        )
