"""The ``"gefen"`` torch.compile backend: ``torch.compile(model, backend="gefen")``.

Graphs compile through inductor, as with ``backend="inductor"``. Two things are added:

- the parameters of every compiled graph are remembered, and a global optimizer step pre-hook
  converts a ``torch.optim.AdamW`` (or an ``Adam`` without coupled weight decay) over them to
  Gefen when it is about to step, before AdamW allocates its state (dynamo would allocate it
  while tracing the step, so the hook runs eagerly: DESIGN "Facts about torch.compile");
- a graph that captured an AdamW step (``torch.compile(opt.step, backend="gefen")`` over an
  optimizer the hook did not convert first) goes through the passes in ``passes/``, which
  convert its optimizer and lower the step to one ``gefen::step_`` call.

Registered for ``torch.compile`` through the ``torch_dynamo_backends`` entry point, so it
works without importing gefen_compile.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch.optim import Adam, AdamW, Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .convert import convert, is_convertible
from .passes import StateReport, rewrite_adamw_steps

log = logging.getLogger("gefen_compile")

# Parameters of compiled graphs, by id (tensors compare elementwise, so no WeakSet).
_PARAMETERS: dict[int, weakref.ref] = {}
_generation = 0  # bumped whenever a parameter is remembered
_checked: weakref.WeakKeyDictionary[Optimizer, int] = weakref.WeakKeyDictionary()
_hook = None


def gefen_backend(gm: torch.fx.GraphModule, example_inputs: list, **kwargs):
    """Compile ``gm`` with inductor, after converting AdamW steps to Gefen (module docstring)."""
    from torch._inductor.compile_fx import compile_fx

    _install_conversion_hook()
    _remember(t for _, t in gm.named_parameters())
    gm, report = rewrite_adamw_steps(gm, example_inputs, release_state=False)
    compiled = compile_fx(gm, example_inputs, **kwargs)
    positions = [i for i, x in enumerate(example_inputs) if _is_parameter(x)]
    return _CompiledGraph(compiled, positions, report.state)


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


def remembered(param: torch.Tensor) -> bool:
    """Whether ``param`` belongs to a graph compiled with this backend."""
    ref = _PARAMETERS.get(id(param))
    return ref is not None and ref() is param


def _is_parameter(t) -> bool:
    return isinstance(t, torch.nn.Parameter) or (
        isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf
    )


def _remember(tensors) -> None:
    global _generation
    for t in tensors:
        if _is_parameter(t) and not remembered(t):
            _PARAMETERS[id(t)] = weakref.ref(t, lambda _, key=id(t): _PARAMETERS.pop(key, None))
            _generation += 1


def _install_conversion_hook() -> None:
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_convert_before_step)


def _convert_before_step(optimizer: Optimizer, args, kwargs) -> None:
    # Exactly AdamW or Adam: a subclass may change the update, and is left alone. This test
    # traces (guarded on the type), so other optimizers' compiled steps keep a single graph.
    if type(optimizer) in (AdamW, Adam):
        _convert_if_compiled(optimizer)


@torch._dynamo.disable  # runs eagerly, also inside a compiled step, before AdamW allocates
def _convert_if_compiled(optimizer: Optimizer) -> None:
    if _checked.get(optimizer) == _generation:
        return
    _checked[optimizer] = _generation
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(remembered(p) for p in params):
        return
    if is_convertible(optimizer):
        convert(optimizer)
    else:
        log.info("not converting %s over compiled parameters: an option Gefen does not "
                 "support (amsgrad, or Adam's coupled weight decay)", type(optimizer).__name__)
