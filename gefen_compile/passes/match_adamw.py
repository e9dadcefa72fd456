"""Find the AdamW updates of a graph by their dataflow (not by op names).

Per parameter, AdamW writes four tensors, and what each one's new value is computed from is
what identifies them, in the for-loop, foreach, functional and aten forms alike:

- a step counter ``s``: a one-element tensor whose new value depends on itself only;
- two moments of one read-only gradient ``g``: tensors whose new value depends on themselves
  and ``g`` only; the second moment is the one that reaches the parameter through a square root;
- the parameter ``p``: its new value depends on exactly ``p``, both moments, the counter, ``g``
  and possibly one-element hyperparameter tensors (a tensor lr; with ``dynamic=True`` dynamo
  passes every float hyperparameter as a 0-d tensor input, which the moments read too).

amsgrad (a third moment), or an update that reads anything else, does not match: such a graph
is left as it is, and the report says why. A matched update whose parameter the graph writes
again afterwards (``p.clamp_(...)``) is reported in ``blocked``: lowering it would drop that write.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from .dataflow import ValueGraph, attribute, value_graph


@dataclass(frozen=True)
class AdamWUpdate:
    """The leaves of one parameter's AdamW update."""

    param: Node
    grad: Node
    exp_avg: Node
    exp_avg_sq: Node
    step: Node
    hyper: tuple[Node, ...] = ()  # one-element tensors it also reads (a tensor lr, say)


class NotRewritten(ValueError):
    """Why a graph with matched AdamW updates cannot be rewritten; :func:`rewrite_adamw_steps`
    then leaves it unchanged. ``quiet``: the graph is not an optimizer's AdamW step at all (an
    INFO line, not a warning)."""

    def __init__(self, reason: str, quiet: bool = False):
        super().__init__(reason)
        self.quiet = quiet


@dataclass
class MatchReport:
    """What :func:`match_adamw` found: the updates, in graph order, the nodes that compute them,
    and why tensors the graph writes were not matched."""

    updates: list[AdamWUpdate] = field(default_factory=list)
    nodes: set[Node] = field(default_factory=set)
    unmatched: dict[str, str] = field(default_factory=dict)  # leaf name -> reason
    blocked: dict[str, str] = field(default_factory=dict)  # matched parameter -> why not lowerable

    def __str__(self) -> str:
        lines = [f"{len(self.updates)} AdamW update(s) over {len(self.nodes)} node(s)"]
        lines += [f"  {u.param.name}: grad {u.grad.name}, exp_avg {u.exp_avg.name}, "
                  f"exp_avg_sq {u.exp_avg_sq.name}, step {u.step.name}" for u in self.updates]
        lines += [f"  not matched: {name}: {why}" for name, why in self.unmatched.items()]
        lines += [f"  cannot be lowered: {name}: {why}" for name, why in self.blocked.items()]
        return "\n".join(lines)


def match_adamw(gm: GraphModule, example_inputs=None) -> tuple[GraphModule, MatchReport]:
    """Find every per-parameter AdamW update of ``gm``; the graph is returned unchanged."""
    values = value_graph(gm)
    written = values.written()
    shapes = _shapes(gm, example_inputs)
    report = MatchReport()
    counters = {w for w in written
                if values.leaves(values.final[w]) == {w} and shapes.get(w, ()) in ((), (1,))}
    moments: dict[Node, list[Node]] = {}  # gradient -> tensors updated from it alone
    for w in written:
        g = _moment_source(values.leaves(values.final[w]) - {w}, written, shapes)
        if g is not None:
            moments.setdefault(g, []).append(w)
    sqrt_free = values.graph.subgraph(v for v in values.graph if "sqrt" not in values.op.get(v, ""))
    claimed = set(counters) | {m for ms in moments.values() for m in ms}
    for p in written:
        if p in claimed:
            continue
        update = _param_update(p, values, counters, moments, sqrt_free, shapes, written)
        if isinstance(update, str):
            report.unmatched[p.name] = update
            continue
        report.updates.append(update)
        if update.exp_avg not in values.last_write_reads(p):
            report.blocked[p.name] = ("written again after its AdamW update (a clamp, say), a "
                                      "write Gefen's fused step would drop")
        for leaf in (update.param, update.exp_avg, update.exp_avg_sq, update.step):
            report.nodes |= values.nodes_behind(values.final[leaf])
    # Element reads of list-valued results (foreach outputs) belong with their list.
    report.nodes |= {u for n in report.nodes for u in n.users if u.target is operator.getitem}
    matched = {leaf for u in report.updates for leaf in (u.exp_avg, u.exp_avg_sq, u.step)}
    for w in claimed - matched:
        report.unmatched.setdefault(w.name, "written, but not part of a matched AdamW update")
    if report.unmatched and report.updates:
        # A node shared with an unmatched write (one foreach op over both) cannot be removed.
        for leaf in (n for n in written if n.name in report.unmatched):
            if values.nodes_behind(values.final[leaf]) & report.nodes:
                report.unmatched[leaf.name] += " (and shares nodes with matched updates)"
    return gm, report


def _param_update(p, values: ValueGraph, counters, moments, sqrt_free, shapes, written):
    """The AdamWUpdate of ``p``, or why ``p``'s write is not one."""
    leaves = values.leaves(values.final[p]) - {p}
    grads = [g for g in leaves if g in moments and len(moments[g]) == 2]
    if len(grads) != 1:
        return "its new value does not read one gradient with two moments"
    g = grads[0]
    first, second = moments[g]
    steps = [s for s in leaves if s in counters]
    rest = leaves - {g, first, second, *steps}
    if len(steps) != 1:
        return "its new value does not read exactly one step counter"
    if any(x in written or shapes.get(x, ()) not in ((), (1,)) for x in rest):
        return "its new value reads tensors other than AdamW's (amsgrad, say)"
    reaches = {m: nx.has_path(sqrt_free, values.final[m], values.final[p]) if
               values.final[m] in sqrt_free else False for m in (first, second)}
    if reaches[first] == reaches[second]:
        return "neither moment (or both) reaches it through a square root"
    exp_avg, exp_avg_sq = (first, second) if reaches[first] else (second, first)
    if len({shapes.get(x) for x in (p, g, exp_avg, exp_avg_sq)}) != 1:
        return "its gradient and moments do not all have its shape"
    return AdamWUpdate(p, g, exp_avg, exp_avg_sq, steps[0], tuple(sorted(rest, key=str)))


def _moment_source(others: set[Node], written, shapes) -> Node | None:
    """The gradient a written tensor is a moment of: the one leaf it reads besides itself and
    one-element hyperparameter inputs (unwritten); None if it reads anything else."""
    if any(x in written for x in others):
        return None
    if len(others) == 1:
        return next(iter(others))
    sources = [x for x in others if shapes.get(x, ()) not in ((), (1,))]
    return sources[0] if len(sources) == 1 else None


def _shapes(gm: GraphModule, example_inputs) -> dict[Node, tuple]:
    """Shapes of the graph's leaves, from their values, example inputs or metadata; a symbolic
    size is kept as its expression's text (SymInts do not hash, and comparing them guards)."""
    shapes = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = list(example_inputs) if example_inputs is not None else [None] * len(placeholders)
    for node, example in zip(placeholders, examples):
        value = example if example is not None else node.meta.get("val", node.meta.get("example_value"))
        if isinstance(value, torch.Tensor):
            shapes[node] = _shape(value)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = attribute(gm, node.target)
            if isinstance(value, torch.Tensor):
                shapes[node] = _shape(value)
    return shapes


def _shape(t: torch.Tensor) -> tuple:
    return tuple(d if isinstance(d, int) else str(d) for d in t.shape)
