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
from .passes import rewrite_adamw_steps

log = logging.getLogger("gefen_compile")

# Parameters of compiled graphs, by id (tensors compare elementwise, so no WeakSet).
_PARAMETERS: dict[int, weakref.ref] = {}
_generation = 0  # bumped whenever parameters are remembered
_checked: weakref.WeakKeyDictionary[Optimizer, int] = weakref.WeakKeyDictionary()
_hook = None


def gefen_backend(gm: torch.fx.GraphModule, example_inputs: list, **kwargs):
    """Compile ``gm`` with inductor, after converting AdamW steps to Gefen (module docstring)."""
    from torch._inductor.compile_fx import compile_fx

    _install_conversion_hook()
    _remember_parameters(gm, example_inputs)
    gm, report = rewrite_adamw_steps(gm, example_inputs, release_state=False)
    compiled = compile_fx(gm, example_inputs, **kwargs)
    if report.state is None:
        return compiled

    def run(*args):
        try:
            return compiled(*args)
        finally:
            report.state.release()  # dynamo has built its guards by now

    return run


def remembered(param: torch.Tensor) -> bool:
    """Whether ``param`` belongs to a graph compiled with this backend."""
    ref = _PARAMETERS.get(id(param))
    return ref is not None and ref() is param


def _remember_parameters(gm: torch.fx.GraphModule, example_inputs: list) -> None:
    global _generation
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    tensors += [t for _, t in gm.named_parameters()] + [t for _, t in gm.named_buffers()]
    for t in tensors:
        if isinstance(t, torch.nn.Parameter) or (t.requires_grad and t.is_leaf):
            _PARAMETERS[id(t)] = weakref.ref(t, lambda _, key=id(t): _PARAMETERS.pop(key, None))
    _generation += 1


def _install_conversion_hook() -> None:
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_convert_before_step)


@torch._dynamo.disable
def _convert_before_step(optimizer: Optimizer, args, kwargs) -> None:
    # Exactly AdamW or Adam: a subclass may change the update, and is left alone.
    if type(optimizer) not in (AdamW, Adam) or _checked.get(optimizer) == _generation:
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
