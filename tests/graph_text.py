"""Readable, normalised text of an FX graph, and golden-file comparison (tests/golden/).

Node names and dynamo's attribute names are unstable, so nodes are renamed by kind and order
(``in0`` placeholders, ``attr0`` get_attr, ``v0`` the rest), except the attributes the passes
add (``gefen_<optimizer>_<bucket>_<field>``); floats print with 6 significant digits. The graph before the passes is dynamo's and varies between torch releases, so it is
compared only on the release that wrote the golden file; the graph after them is compared
everywhere. ``GEFEN_UPDATE_GOLDEN=1 pytest ...`` rewrites the files.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.fx import GraphModule, Node

GOLDEN = Path(__file__).parent / "golden"


def graph_text(gm: GraphModule) -> str:
    names: dict[Node, str] = {}
    counts = {"in": 0, "attr": 0, "v": 0}
    lines = []
    for node in gm.graph.nodes:
        if node.op == "output":
            lines.append(f"return {_arg(node.args[0], names)}")
            continue
        kind = {"placeholder": "in", "get_attr": "attr"}.get(node.op, "v")
        names[node] = f"{kind}{counts[kind]}"
        counts[kind] += 1
        if node.op in ("placeholder", "get_attr"):
            # The passes' own attributes have stable, meaningful names; dynamo's do not.
            own = node.op == "get_attr" and node.target.startswith("gefen_")
            lines.append(f"{names[node]} = {node.op}" + (f" {node.target}" if own else ""))
            continue
        args = [_arg(a, names) for a in node.args]
        args += [f"{k}={_arg(v, names)}" for k, v in node.kwargs.items()]
        lines.append(f"{names[node]} = {_target(node)}({', '.join(args)})")
    return "\n".join(lines) + "\n"


def check_golden(name: str, before: str, after: str) -> None:
    path = GOLDEN / f"{name}.txt"
    release = ".".join(torch.__version__.split(".")[:2])
    text = f"# torch {release}\n## before\n{before}## after\n{after}"
    if os.environ.get("GEFEN_UPDATE_GOLDEN") == "1" or not path.exists():
        if os.environ.get("GEFEN_UPDATE_GOLDEN") != "1":
            raise AssertionError(f"no golden file {path}; run with GEFEN_UPDATE_GOLDEN=1")
        path.write_text(text)
        return
    golden = path.read_text()
    header, rest = golden.split("\n", 1)
    golden_before, golden_after = rest.removeprefix("## before\n").split("## after\n")
    assert after == golden_after, f"graph after the passes differs from {path}"
    if header == f"# torch {release}":
        assert before == golden_before, f"captured graph differs from {path}"


def _target(node: Node) -> str:
    target = node.target
    if node.op == "call_method":
        return f".{target}"
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target}"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", getattr(target, "__name__", str(target)))
    if module.startswith("torch._C"):
        module = "torch"
    return f"{module}.{name}" if module and module != "builtins" else name


def _arg(value, names) -> str:
    if isinstance(value, Node):
        return names[value]
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_arg(v, names) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)
