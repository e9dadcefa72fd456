"""All matched AdamW updates -> one ``gefen::step_`` call per Gefen bucket (one per optimizer
and parameter dtype: a single call for the usual one-dtype model).

The call goes where the last matched node was, and every node that only computed AdamW's
update is removed, with the state tensors it read. Gefen's flat state, its codebook tables and
its hyperparameter table become attributes of the graph module; parameters and gradients are
the graph's own nodes. Float hyperparameters are constants, as in the graph dynamo traced
(dynamo guards on them); a tensor lr is read from the live tensor at every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch._dynamo.source import ConstantSource
from torch.fx import GraphModule, Node

from .. import ops  # noqa: F401  (registers torch.ops.gefen)
from ..optim import Gefen, hyper_table
from .match_adamw import MatchReport, NotRewritten
from .rewrite_state import StateReport


@dataclass
class LowerReport:
    """The ``gefen::step_`` nodes inserted and how many nodes they replaced."""

    calls: list[Node] = field(default_factory=list)
    removed: int = 0

    def __str__(self) -> str:
        return f"{len(self.calls)} gefen::step_ call(s) replace {self.removed} node(s)"


def with_tensor_lrs(table: torch.Tensor, rows: list[int], lrs: list[torch.Tensor]) -> torch.Tensor:
    """``table`` with column 0 (lr) of ``rows`` set from the tensor lrs."""
    table = table.clone()
    table[rows, 0] = torch.stack([lr.to(table) for lr in lrs])
    return table


def lower_fused(
    gm: GraphModule, matches: MatchReport, state: StateReport
) -> tuple[GraphModule, LowerReport]:
    """Replace the matched updates of ``gm`` by Gefen steps (see the module docstring)."""
    report = LowerReport()
    if not matches.updates:
        return gm, report
    problem = lowering_problem(matches)
    if problem:
        raise NotRewritten(problem)
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max(matches.nodes, key=order.__getitem__)
    nodes_of = {state.values[leaf]: leaf for u in matches.updates for leaf in (u.param, u.grad)}
    grads = {state.values[u.param]: u.grad for u in matches.updates}
    with graph.inserting_before(last.next):  # in order, where the last update was
        for index, (optimizer, _) in enumerate(state.owners):
            for b, bucket in enumerate(optimizer._buckets):
                prefix = f"gefen_{index}_{b}"
                attr = _Attributes(gm, prefix)
                params = [nodes_of.get(p) or attr.node(f"param_{j}", p)
                          for j, p in enumerate(bucket.params)]
                inputs = optimizer._kernel_args(bucket, [None] * len(bucket.params))
                args = [params, [grads.get(p) for p in bucket.params]]
                for name, value in zip(inputs._fields[2:], inputs[2:]):
                    if name == "skip":  # GradScaler's flag: eager steps only
                        continue
                    if name == "hyper":
                        args.append(_hyper_node(graph, attr, optimizer, bucket.codes.device))
                    elif isinstance(value, torch.Tensor):
                        args.append(attr.node(name, value))
                    elif name == "work":  # a list of tables
                        args.append([attr.node(f"work_{i}", t) for i, t in enumerate(value)])
                    else:
                        args.append(value)
                report.calls.append(graph.call_function(torch.ops.gefen.step_.default, tuple(args)))
    removed = sorted(matches.nodes, key=order.__getitem__, reverse=True)
    leaves = {leaf for u in matches.updates for leaf in (u.exp_avg, u.exp_avg_sq, u.step)}
    for node in removed:
        graph.erase_node(node)
    # AdamW's state tensors: placeholders stay (the signature is the caller's), attributes go.
    for leaf in leaves:
        if leaf.op == "get_attr" and not leaf.users:
            graph.erase_node(leaf)
            if not any(n.op == "get_attr" and n.target == leaf.target for n in graph.nodes):
                _drop_attribute(gm, leaf.target)
    report.removed = len(removed)
    graph.lint()
    gm.recompile()
    return gm, report


def lowering_problem(matches: MatchReport) -> str | None:
    """Why the matched updates cannot be replaced by Gefen steps, or None (checked before
    anything is converted: a refusal changes nothing)."""
    outside = [u for n in matches.nodes for u in n.users if u not in matches.nodes]
    if outside:
        return (f"graph node {outside[0].name!r} reads a value of the AdamW update (a moment, "
                "say), which Gefen does not keep")
    for name, why in matches.blocked.items():
        return f"graph node {name!r} is {why}"
    return None


class _Attributes:
    """Tensors stored on the graph module as ``{prefix}_{name}``, with their get_attr nodes."""

    def __init__(self, gm: GraphModule, prefix: str):
        self.gm, self.prefix = gm, prefix

    def node(self, name: str, value: torch.Tensor) -> Node:
        target = f"{self.prefix}_{name}"
        if isinstance(value, torch.nn.Parameter):
            self.gm.register_parameter(target, value)
        else:
            self.gm.register_buffer(target, value, persistent=False)
        sources = getattr(self.gm, "_param_name_to_source", None)
        if sources is not None:
            # A graph from dynamo: inductor lifts its attributes as inputs and asks dynamo's
            # record where each came from; these come from the Gefen optimizer, not user code.
            sources[target] = ConstantSource(f"gefen_compile.{target}")
        return self.gm.graph.get_attr(target)


def _hyper_node(graph, attr: _Attributes, optimizer: Gefen, device) -> Node:
    table = attr.node("hyper", hyper_table(optimizer.param_groups, device))
    rows = [i for i, g in enumerate(optimizer.param_groups) if isinstance(g["lr"], torch.Tensor)]
    if not rows:
        return table
    lrs = [attr.node(f"lr_{i}", optimizer.param_groups[i]["lr"]) for i in rows]
    return graph.call_function(with_tensor_lrs, (table, rows, lrs))


def _drop_attribute(gm: GraphModule, target: str) -> None:
    *path, name = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    delattr(owner, name)
