"""The ``"gefen"`` torch.compile backend: ``torch.compile(model, backend="gefen")``.

Graphs compile through inductor, as with ``backend="inductor"``: ``mode``, ``options`` and
``dynamic`` mean what they mean there. Three things are added:

- the parameters of every compiled graph are remembered, and a global optimizer step pre-hook
  converts a ``torch.optim.AdamW`` (or an ``Adam`` without coupled weight decay) over them to
  Gefen, and a ``torch.optim.Muon`` to GefenMuon, when it is about to step, before it allocates
  its state (dynamo would allocate it
  while tracing the step, so the hook runs eagerly: DESIGN "Facts about torch.compile");
- from its first use in a process (torch.compile resolves the name, importing this module),
  an exact AdamW, Adam or Muon that loads a Gefen (GefenMuon) checkpoint is converted at that
  load (convert_at_load.py): a run resumes from its checkpoint before its first step, and
  before its model's first graph compiles;
- a graph that captured an AdamW step (``torch.compile(opt.step, backend="gefen")`` over an
  optimizer the hook did not convert first) goes through the passes in ``passes/``, which
  convert its optimizer and lower the step to one ``gefen::step_`` call.

The backend never breaks a compile that inductor accepts: a graph that writes no parameter in
place (every model's forward and backward) goes to inductor untouched, and an unexpected
failure inside the passes logs a warning and compiles the graph as dynamo traced it. A step
graph the passes refuse, of an AdamW the step hook will convert at its next step (or of a
Muon: the passes match AdamW's update only), runs eagerly instead (dynamo's SkipFrame), once:
compiled, it would keep the original's state alive. A
non-finite first gradient fails the compile with Gefen's error, as Gefen's eager step fails.

Registered for ``torch.compile`` through the ``torch_dynamo_backends`` entry point, so it
works without importing gefen_compile.
"""

from __future__ import annotations

import copy
import logging
import weakref

import torch
from torch.optim import Adam, AdamW, Muon, Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import convert_at_load
from .convert import closure_of, convert, is_convertible, with_closure
from .learned_state import LearnedState, NonFiniteFirstGradient
from .passes import StateReport, rewrite_adamw_steps
from .passes.dataflow import is_inplace
from .passes.rewrite_state import leaf_values, owners_of

log = logging.getLogger("gefen_compile")

# Parameters of compiled graphs, by id (tensors compare elementwise, so no WeakSet); and the
# plain leaf tensors needing a gradient that graphs take as inputs, which are not converted
# (an image optimised through the model), only logged (functional_call's parameters).
_PARAMETERS: dict[int, weakref.ref] = {}
_INPUTS: dict[int, weakref.ref] = {}
_generation = 0  # bumped whenever a tensor is remembered
# Muons seen stepping (the step hook sees every optimizer): the candidates for a captured
# Muon step, without scanning the heap.
_MUONS: weakref.WeakSet[Optimizer] = weakref.WeakSet()
_checked: weakref.WeakKeyDictionary[Optimizer, int] = weakref.WeakKeyDictionary()


def gefen_backend(
    gm: torch.fx.GraphModule, example_inputs: list, *, mode: str | None = None,
    options: dict | None = None,
):
    """Compile ``gm`` with inductor, after converting AdamW steps to Gefen (module docstring).
    ``mode`` and ``options``: those of ``torch.compile``, applied as inductor applies them (an
    unknown one raises inductor's own error)."""
    # torch.compile hands a custom backend mode/options as keywords and keeps dynamic for
    # dynamo; inductor's own wrapper turns them into its config patches.
    inductor = torch._TorchCompileInductorWrapper(mode, options, None)
    _remember(t for _, t in gm.named_parameters())
    state = None
    if writes_a_parameter(gm, example_inputs):
        gm, state = _rewritten(gm, example_inputs)
    compiled = inductor(gm, example_inputs)
    _forget_specialised_floats()
    # The model's parameters: a plain leaf tensor that needs a gradient is an input (an image
    # that style transfer or an adversarial attack optimises through the model), and an
    # optimizer over it is left as the user built it.
    positions = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
    _remember((x for x in example_inputs if _is_parameter(x)
               and not isinstance(x, torch.nn.Parameter)), _INPUTS)
    return _CompiledGraph(compiled, positions, state)


def _forget_specialised_floats() -> None:
    """Forget which floats dynamo specialised in the graph just compiled. Dynamo (torch 2.11 to
    2.13) keeps that record (TensorifyState) across frames, by per-frame symbol names: a
    float this graph held unused, as the lr that a converted AdamW's original step reads on
    its empty lists, was specialised in whichever later frame named its own float alike,
    Gefen's update: compiled anew for each value of an lr schedule. Retraces of one frame,
    which the record serves, happen before its compile returns."""
    state = getattr(torch._dynamo.symbolic_convert, "TensorifyState", None)
    if state is not None:
        state.clear()


def writes_a_parameter(gm: torch.fx.GraphModule, example_inputs: list) -> bool:
    """Whether an op of ``gm`` writes a parameter in place: the cheap test every AdamW update
    passes (it writes its parameter directly) and no forward or backward graph does."""
    params = {node for node, t in leaf_values(gm, example_inputs).items() if _is_parameter(t)}
    for node in gm.graph.nodes:
        if params and node.op in ("call_function", "call_method") and node.args:
            first = node.args[0]
            written = first if isinstance(first, (list, tuple)) else (first,)
            if any(isinstance(w, torch.fx.Node) and w in params for w in written) and is_inplace(node):
                return True
    return False


def _rewritten(gm: torch.fx.GraphModule, example_inputs: list):
    """``gm`` with its AdamW updates lowered to Gefen and the state report; where the passes
    refuse it (they log why) or fail unexpectedly (a warning says why), ``gm`` as it came and
    no report."""
    graph, attributes = _snapshot(gm.graph), set(gm._buffers) | set(gm._parameters)
    try:
        # The graph runs once: the conversion changes the optimizer's class, and dynamo
        # traces its next step anew (through the converted optimizer's own update).
        gm, report = rewrite_adamw_steps(gm, example_inputs, release_state=False,
                                         runs_once=True)
        owners = [] if report.state is not None else (
            (owners_of(gm, report.matched, example_inputs) if report.refused else [])
            + _muons_stepped_by(gm, example_inputs))
        if owners and all(is_convertible(o) for o in owners):
            # Compiled as traced, the graph would hold AdamW's state tensors for good (dynamo
            # keeps a traced optimizer step's graph until the optimizer dies), also after the
            # step hook converted the optimizer at its next step. This step runs eagerly
            # instead, as AdamW's, the graph let go of the state, and the next step is Gefen's.
            _remember(p for o in owners for g in o.param_groups for p in g["params"])
            _drop_attributes(gm, {id(t) for o in owners for entry in o.state.values()
                                  for t in entry.values() if isinstance(t, torch.Tensor)})
            raise torch._dynamo.exc.SkipFrame(f"gefen: {report.refused}")
        return gm, report.state
    except (NonFiniteFirstGradient, torch._dynamo.exc.SkipFrame):
        raise  # nothing changed: the step fails as Gefen's eager one, or runs eagerly
    except Exception as error:  # noqa: BLE001 (any failure: the graph compiles unchanged)
        log.warning("the gefen backend left a graph with an optimizer step as dynamo traced "
                    "it, so its AdamW update is not Gefen's (%s: %s)", type(error).__name__,
                    str(error), exc_info=log.isEnabledFor(logging.DEBUG))
        for name in (set(gm._buffers) | set(gm._parameters)) - attributes:
            delattr(gm, name)
        gm.graph = graph
        gm.recompile()
        return gm, None


def _muons_stepped_by(gm: torch.fx.GraphModule, example_inputs: list) -> list[Optimizer]:
    """The live, exact ``torch.optim.Muon``s whose momentum buffers ``gm`` reads: the passes
    match AdamW's update only, and a Muon's captured step, compiled as traced, would keep its
    buffers alive after the step hook converted it."""
    if not _MUONS:
        return []
    ids = {id(t) for t in leaf_values(gm, example_inputs).values()}
    return [o for o in list(_MUONS) if type(o) is Muon and any(
        id(entry.get("momentum_buffer")) in ids for entry in o.state.values())]


def _drop_attributes(gm: torch.fx.GraphModule, ids: set[int]) -> None:
    """Remove the buffers and parameters of ``gm`` that are the tensors with these ids."""
    for table in (gm._buffers, gm._parameters):
        for name in [n for n, t in table.items() if id(t) in ids]:
            del table[name]


def _snapshot(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of ``graph`` to restore: with the attributes dynamo sets on nodes outside their
    meta (a placeholder's ``_dynamo_source``, read by AOT autograd), which copying drops."""
    copied = copy.deepcopy(graph)
    for old, new in zip(graph.nodes, copied.nodes):
        for key, value in vars(old).items():
            vars(new).setdefault(key, value)
    return copied


class _CompiledGraph:
    """Inductor's compiled graph, with the backend's work around its calls.

    Parameters are graph inputs, and dynamo reuses a compiled graph for another model of the
    same structure without calling the backend again: so the parameters are remembered from
    the inputs of a call, whenever they are not the ones of the previous call (an identity
    check of one input, not a loop, on the usual call)."""

    def __init__(self, compiled, positions: list[int], state: StateReport | None):
        self.compiled, self.positions, self.state = compiled, positions, state
        self.last: weakref.ref | None = None

    def __call__(self, *args):
        if self.positions and (self.last is None or self.last() is not args[self.positions[0]]):
            _remember(args[i] for i in self.positions)
            self.last = weakref.ref(args[self.positions[0]])
        try:
            return self.compiled(*args)
        finally:
            if self.state is not None:  # dynamo has built its guards by now
                self.state.release()
                self.state = None


def remembered(param: torch.Tensor, table: dict[int, weakref.ref] = _PARAMETERS) -> bool:
    """Whether ``param`` belongs to a graph compiled with this backend (is in ``table``)."""
    ref = table.get(id(param))
    return ref is not None and ref() is param


def _is_parameter(t) -> bool:
    return isinstance(t, torch.nn.Parameter) or (
        isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf
    )


def _remember(tensors, table: dict[int, weakref.ref] = _PARAMETERS) -> None:
    global _generation
    for t in tensors:
        if not remembered(t, table):
            table[id(t)] = weakref.ref(t, lambda _, key=id(t): table.pop(key, None))
            _generation += 1


def _convert_before_step(optimizer: Optimizer, args, kwargs):
    # Exactly AdamW, Adam or Muon: a subclass may change the update, and is left alone. This
    # test traces (guarded on the type and on whether the state is empty), so other optimizers'
    # compiled steps keep a single graph; and so does a compiled step of one that has state
    # (fullgraph=True works after an eager first step, as without the backend): what the hook
    # must come before, dynamo allocating the original's state as it traces, is done.
    if type(optimizer) in (AdamW, Adam, Muon) and not (torch.compiler.is_compiling()
                                                       and optimizer.state):
        return _convert_if_compiled(optimizer, args, kwargs)
    return None


@torch._dynamo.disable  # runs eagerly, also inside a compiled step, before AdamW allocates
def _convert_if_compiled(optimizer: Optimizer, args, kwargs):
    """Convert ``optimizer`` if its parameters belong to a compiled graph. Before its first
    step, its closure is also watched (see :func:`_converting_after`)."""
    if type(optimizer) is Muon:
        _MUONS.add(optimizer)
    if _checked.get(optimizer) != _generation:
        _convert_known(optimizer)
    closure = closure_of(args, kwargs)
    if closure is None or optimizer.state or isinstance(optimizer, LearnedState):
        return None
    return with_closure(args, kwargs, _converting_after(optimizer, closure))


def _converting_after(optimizer: Optimizer, closure):
    """``closure``, then the conversion its graphs may call for: Lightning's automatic
    optimization runs the model's first forward and backward (the first compiled graphs) in
    the step's closure, which the step calls after every hook, where the original calls it.
    Converted there, the optimizer takes Gefen's update at once; the original's step then goes
    on over no state, as a converted optimizer's does."""

    def closure_then_convert():
        loss = closure()
        if not isinstance(optimizer, LearnedState) and _checked.get(optimizer) != _generation:
            _convert_known(optimizer)
            if isinstance(optimizer, LearnedState):
                optimizer._update(lambda: loss)
        return loss

    return closure_then_convert


def _convert_known(optimizer: Optimizer) -> None:
    """Convert ``optimizer`` if a compiled graph holds one of its parameters."""
    _checked[optimizer] = _generation
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(remembered(p) for p in params):
        if any(remembered(p, _INPUTS) for p in params):
            log.info("left %s over tensors that a compiled graph takes as inputs, not "
                     "nn.Parameters (an image optimised through the model, parameters passed "
                     "to torch.func.functional_call), as it is: gefen_compile.convert(optimizer) "
                     "makes it Gefen", type(optimizer).__name__)
        return
    if is_convertible(optimizer):
        convert(optimizer)
    else:
        log.info("not converting %s over compiled parameters: an option Gefen does not "
                 "support (amsgrad, Adam's coupled weight decay, or a Muon parameter that is not "
                 "2-D)", type(optimizer).__name__)


# From the backend's first use in a process (torch.compile resolving "gefen" imports this
# module), not from its first graph: that graph may compile inside the first step's closure,
# after the step's hooks were chosen, or after a resumed run loaded its checkpoint.
register_optimizer_step_pre_hook(_convert_before_step)
convert_at_load.install("backend", is_convertible)
