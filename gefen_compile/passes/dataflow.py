"""The value-level dataflow of an FX graph, for matching optimizer updates by structure.

An optimizer step mutates tensors in place, often many at once (``torch._foreach_*`` ops apply
one operation lane by lane over lists of tensors). Matching its updates by op names is fragile
(dynamo's polyfills and decompositions rename them), so the passes look at values instead: every
write of a tensor creates a new *version* of it, every op lane creates a value from the current
versions of its inputs, and a directed graph (networkx) records which value was computed from
which. The question "which tensors does the final value of this parameter depend on" is then a
reachability question, whatever ops the graph spells it with.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import networkx as nx
import torch
from torch.fx import GraphModule, Node

# Python's in-place operators: on tensors they write their first operand (``x[i] = v``, a
# setitem, writes ``x`` too).
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ipow, operator.setitem}

# A Node, or (Node, int lane) for one element of a list-valued node. Keys hold nodes and ints
# only: node arguments (slices, lists, dtypes, ...) are never hashed, since slices are
# unhashable before Python 3.12.
Key = Any


@dataclass
class ValueGraph:
    """Values of one graph: ``graph`` has an edge from every input value of an op lane to the
    value it computes. Leaves are placeholders and get_attr nodes (tensors that exist before the
    graph runs); ``initial[leaf]`` is the value a leaf holds on entry and ``final[leaf]`` the
    one it holds on exit (different exactly when the graph writes it)."""

    graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    initial: dict[Node, int] = field(default_factory=dict)
    final: dict[Node, int] = field(default_factory=dict)
    producer: dict[int, Node] = field(default_factory=dict)  # value -> node that computed it
    op: dict[int, str] = field(default_factory=dict)  # value -> name of the op that computed it
    leaf_of: dict[int, Node] = field(default_factory=dict)  # initial value -> its leaf
    versions: dict[Node, list[int]] = field(default_factory=dict)  # written leaf -> its values

    def last_write_reads(self, leaf: Node) -> set[Node]:
        """The leaves that the last write of ``leaf`` reads through anything but ``leaf``'s
        own previous value (for ``p.clamp_(...)``: none; for AdamW's last write of ``p``: its
        moments, counter, gradient, ...)."""
        *_, previous, last = self.versions[leaf]
        around = nx.restricted_view(self.graph, [previous], [])  # p.copy_(p.clamp(...)) too
        reach = {a for v in self.graph.predecessors(last) if v != previous
                 for a in nx.ancestors(around, v) | {v}}
        return {self.leaf_of[v] for v in reach if v in self.leaf_of}

    def written(self) -> list[Node]:
        """Leaves the graph writes, in graph order."""
        return [leaf for leaf, v in self.final.items() if v != self.initial[leaf]]

    def leaves(self, value: int) -> set[Node]:
        """The leaves whose entry values ``value`` was computed from (itself included)."""
        reach = nx.ancestors(self.graph, value) | {value}
        return {self.leaf_of[v] for v in reach if v in self.leaf_of}

    def nodes_behind(self, value: int) -> set[Node]:
        """The (non-leaf) nodes that computed ``value`` or any value it depends on."""
        reach = nx.ancestors(self.graph, value) | {value}
        return {self.producer[v] for v in reach if v in self.producer}


def value_graph(gm: GraphModule) -> ValueGraph:
    """Build the :class:`ValueGraph` of ``gm``."""
    values = ValueGraph()
    current: dict[Key, int] = {}  # storage -> its current value
    alias: dict[Key, Key] = {}  # result of an in-place op -> the storage it wrote

    def storage(key: Key) -> Key:
        while key in alias:
            key = alias[key]
        return key

    def read(key: Key) -> int:
        key = storage(key)
        if key not in current:  # a leaf read for the first time, or an opaque value
            v = _new_value(values)
            current[key] = v
            if isinstance(key, Node) and key.op in ("placeholder", "get_attr"):
                values.initial[key] = values.final[key] = v
                values.leaf_of[v] = key
        return current[key]

    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        if _is_list_element(node):
            alias[node] = (node.args[0], node.args[1])
            continue
        name = op_name(node)
        inplace = is_inplace(node)
        lanes = _lanes(node)
        for lane, (inputs, target) in enumerate(lanes):
            v = _new_value(values)
            values.producer[v], values.op[v] = node, name
            for key in inputs:
                values.graph.add_edge(read(key), v)
            if inplace:
                base = storage(target)
                current[base] = v
                if isinstance(base, Node) and base in values.initial:
                    values.final[base] = v
                    values.versions.setdefault(base, [values.initial[base]]).append(v)
                out = node if len(lanes) == 1 else (node, lane)
                alias[out] = base
            else:
                current[node if len(lanes) == 1 else (node, lane)] = v
    return values


def op_name(node: Node) -> str:
    """A readable name for the op of ``node`` ("add_", "_foreach_mul_", "aten.lerp_", ...)."""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.replace("::", ".")
    return getattr(target, "__name__", str(target))


def is_inplace(node: Node) -> bool:
    """Whether ``node`` writes its first tensor argument (or, for a foreach op, the tensors of
    its first list)."""
    target = node.target
    if target in _INPLACE_OPERATORS:
        return True
    if isinstance(target, torch._ops.OpOverload):
        args = target._schema.arguments
        return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write
    name = op_name(node).rsplit(".", 1)[-1]
    return name.endswith("_") and not name.endswith("__")


def attribute(gm: GraphModule, target: str) -> Any:
    """The object a get_attr node of ``gm`` loads."""
    return reduce(getattr, target.split("."), gm)


def _is_list_element(node: Node) -> bool:
    """Whether ``node`` reads one element of a list-valued node (``out[2]`` of a foreach op).
    Indexing a tensor (``x[1:]``, ``x[0]``, ``x[idx]``) is an op like any other: it computes a
    value from ``x`` (and the index tensors)."""
    if node.target is not operator.getitem or not isinstance(node.args[0], Node):
        return False
    source = node.args[0]
    value = source.meta.get("example_value", source.meta.get("val"))
    return isinstance(node.args[1], int) and not isinstance(value, torch.Tensor)


def _lanes(node: Node) -> list[tuple[list[Key], Key | None]]:
    """The op lanes of ``node``: for each, its input keys and the key it writes if in place.
    A foreach op has one lane per element of its list arguments; any other op (``cat`` of a
    list, ``index_put_`` with a list of indices) has one, reading every node in its arguments
    and writing its first argument."""
    args = [*node.args, *node.kwargs.values()]
    if "_foreach_" not in op_name(node):
        shared = [x for x in _flat(args) if isinstance(x, Node)]
        first = node.args[0] if node.args and isinstance(node.args[0], Node) else None
        return [(shared, first)]
    lists = [a for a in args if isinstance(a, (list, tuple)) and any(isinstance(x, Node) for x in a)]
    shared = [a for a in args if isinstance(a, Node)]
    if not lists:
        return [(shared, shared[0] if shared else None)]
    width = len(lists[0])
    lanes = []
    for i in range(width):
        inputs = [lst[i] for lst in lists if i < len(lst) and isinstance(lst[i], Node)] + shared
        target = lists[0][i] if isinstance(lists[0][i], Node) else None
        lanes.append((inputs, target))
    return lanes


def _flat(args) -> list:
    """The elements of ``args``, nested lists, tuples and slices flattened."""
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out += _flat(a)
        elif isinstance(a, slice):
            out += _flat((a.start, a.stop, a.step))
        else:
            out.append(a)
    return out


def _new_value(values: ValueGraph) -> int:
    v = values.graph.number_of_nodes()
    values.graph.add_node(v)
    return v
