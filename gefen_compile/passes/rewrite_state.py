"""AdamW state -> Gefen state for the updates a graph was matched with.

The optimizer that owns each matched parameter is found by tensor identity (the graph's leaves
are the optimizer's own tensors: get_attr values, or example inputs for placeholders) and
converted in place (convert.py): state it has stepped with is migrated, and parameters still
without state get their periods (and, first of all, the codebook) from the example gradients,
exactly as Gefen's first step would. The graph itself is returned unchanged: lower_fused.py
replaces its AdamW math by the Gefen step over the new state.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node
from torch.optim import Adam

from ..convert import convert
from ..optim import Gefen
from .dataflow import attribute
from .match_adamw import AdamWUpdate, MatchReport

_MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class StateReport:
    """The optimizers that own the matched updates, each with its updates, now Gefen.

    Their AdamW moment tensors stay in ``optimizer.state`` (beside the Gefen state, unused)
    until :meth:`release`: dynamo builds the guards of the graph being compiled, which read
    them, after the backend returns."""

    owners: list[tuple[Gefen, list[AdamWUpdate]]] = field(default_factory=list)
    values: dict[Node, torch.Tensor] = field(default_factory=dict)  # leaf -> its tensor
    kept: list[dict] = field(default_factory=list)  # state entries holding AdamW moments

    def release(self) -> None:
        """Drop the AdamW moments kept for dynamo's guards (their memory goes with them)."""
        for entry in self.kept:
            for key in _MOMENTS:
                entry.pop(key, None)
        self.kept.clear()

    def __str__(self) -> str:
        return "\n".join(
            f"{type(opt).__name__} at {id(opt):#x}: {len(updates)} parameter(s) now in Gefen "
            f"state" for opt, updates in self.owners
        ) or "no optimizer converted"


def rewrite_state(
    gm: GraphModule, matches: MatchReport, example_inputs=None
) -> tuple[GraphModule, StateReport]:
    """Convert the owner of every matched update to Gefen (see the module docstring)."""
    values = leaf_values(gm, example_inputs)
    report = StateReport(values=values)
    by_owner: dict[int, tuple[torch.optim.Optimizer, list[AdamWUpdate]]] = {}
    optimizers = _live_adam_optimizers()
    for update in matches.updates:
        param = values.get(update.param)
        owner = next((o for o in optimizers if _owns(o, param, values.get(update.exp_avg))), None)
        if owner is None:
            raise ValueError(
                f"gefen_compile: the AdamW update of graph node {update.param.name!r} updates a "
                "tensor that no live torch.optim.Adam/AdamW optimizer holds (or holds with other "
                "state tensors); the passes rewrite an optimizer's step, so pass the graph the "
                "optimizer's own parameters and state (as example_inputs for placeholders)"
            )
        by_owner.setdefault(id(owner), (owner, []))[1].append(update)
    for owner, updates in by_owner.values():
        moments = {p: {k: owner.state[p][k] for k in _MOMENTS if k in owner.state.get(p, {})}
                   for p in (values[u.param] for u in updates)}
        gefen = convert(owner)
        fresh = [(update, values[update.param], values.get(update.grad)) for update in updates
                 if not gefen.state.get(values[update.param])]
        if fresh:
            _check_real(fresh)
            gefen._initialise([(_group_of(gefen, p), p, g) for _, p, g in fresh])
        elif gefen._buckets is None:
            gefen._buckets = gefen._build_buckets({})
        for p, kept in moments.items():
            gefen.state[p].update(kept)
            report.kept.append(gefen.state[p])
        report.owners.append((gefen, updates))
    return gm, report


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


def _live_adam_optimizers() -> list[torch.optim.Optimizer]:
    # Compile-time only: the graph names tensors, and only the heap knows who holds them.
    return [o for o in gc.get_objects() if issubclass(type(o), Adam)]


def _owns(optimizer: torch.optim.Optimizer, param, exp_avg) -> bool:
    if param is None:
        return False
    state = optimizer.state.get(param)
    in_groups = any(p is param for g in optimizer.param_groups for p in g["params"])
    return in_groups and (state is None or state.get("exp_avg") is exp_avg or "codes" in state)


def _group_of(optimizer: Gefen, param: torch.Tensor) -> dict:
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


def _check_real(fresh) -> None:
    for update, _, grad in fresh:
        if grad is None or isinstance(grad, torch._subclasses.FakeTensor) or grad.is_meta:
            raise ValueError(
                f"gefen_compile: the gradient of graph node {update.param.name!r} has no real "
                "value, and Gefen's first step reads periods and its codebook from first "
                "gradients; pass the real example_inputs (as a torch.compile backend gets them)"
            )
