"""Gefen's operations as ``torch.library`` custom ops, so they trace under ``torch.compile``
with no graph break (fake implementations give shapes only).

- ``gefen::step_``: one step of every row of a bucket (all its parameters, all groups), in place.
- ``gefen::histogram``: the first-step histogram of normalised gradient rows.
- ``gefen::first_gradient_facts``: whether several first gradients are finite and non-zero,
  and the scores of their candidate periods.
- ``gefen::momentum_``: GefenMuon's momentum step of one matrix, in place, returning the
  bfloat16 update its Newton-Schulz iteration starts from.

CPU runs the C kernels (kernels/cpu_step.c), or where they are not built (no C compiler at
install time) the plain-torch step (kernels/torch_step.py) and the ops' own torch bodies, after
one warning; CUDA runs the Triton kernel for the step and plain torch ops, with no host round
trip, for the first-step ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .codebook import NUM_BINS, LookupTables, gradient_histogram
from .kernels import StepInputs, cpu_step, momentum, native, torch_step
from .partition import period_scores as tensor_period_scores


@torch.library.custom_op("gefen::step_", mutates_args=("params", "codes", "magnitude", "vmean", "steps"))
def step_(
    params: list[Tensor],
    grads: list[Tensor | None],
    codes: Tensor,
    magnitude: Tensor,
    vmean: Tensor,
    steps: Tensor,
    segments: Tensor,
    num_rows: int,
    param_group: Tensor,
    hyper: Tensor,
    codebook: Tensor,
    lut: Tensor,
    bounds: Tensor,
    first_index: Tensor,
    lut_half: int,
    work: list[Tensor],
    work_classes: list[int],
    skip: Tensor | None = None,
) -> None:
    """One Gefen step of a bucket, in place (see ``gefen_compile.state.Bucket``).

    ``hyper`` is float64 [groups, 6] (lr, beta1, beta2, eps, weight_decay, maximize) on the
    bucket's device; a None grad skips that parameter; codebook .. lut_half are the fields of a
    ``codebook.LookupTables``; ``work`` and ``work_classes``: how the CUDA kernel divides the
    rows among its programs (kernels/work_plan.py; empty on the CPU); ``skip``: a one-element
    tensor on the bucket's device, non-zero to change nothing (GradScaler's ``found_inf``: on
    CUDA the step is skipped on the device, with no host sync)."""
    raise NotImplementedError(
        f"gefen::step_ runs on CPU and CUDA tensors, not {codes.device.type}"
    )


def _cpu_kernel(in_c: Callable, in_torch: Callable) -> Callable:
    """A CPU kernel: ``in_c`` where the C library is built (called as it is: no added per-call
    work), else ``in_torch`` behind the once-per-process missing-compiler warning."""
    if native.library is not None:
        return in_c

    def without_c(*args):
        native.warn_missing()
        return in_torch(*args)

    return without_c


def _step_cuda(*args) -> None:
    from .kernels import triton_step  # triton is only needed where CUDA is

    triton_step.step(*args)


# The kernels take the op's arguments as they are (see kernels.StepInputs).
_STEP_KERNELS = {"cpu": _cpu_kernel(cpu_step.step, torch_step.step), "cuda": _step_cuda}
for _device, _kernel in _STEP_KERNELS.items():
    step_.register_kernel(_device)(_kernel)


def run_step(args: StepInputs) -> None:
    """``gefen::step_`` on ``args``: through the op where torch.compile traces it; in eager
    mode its kernel directly, with the version counters of what it writes bumped in one call
    (the op's dispatch costs about a microsecond per tensor, as much as the whole step's
    other host work)."""
    if torch.compiler.is_compiling():
        step_(*args)
        return
    _STEP_KERNELS[args.codes.device.type](*args)
    torch.autograd.graph.increment_version(
        [*args.params, args.codes, args.magnitude, args.vmean, args.steps]
    )


@step_.register_fake
def _step_fake(*args) -> None:
    return None


@torch.library.custom_op("gefen::histogram", mutates_args=())
def histogram(grads: list[Tensor], rows: list[int], negate: list[bool]) -> Tensor:
    """int64 [4096] counts of every gradient viewed as rows of ``rows[t]`` elements (the last
    holds what remains), each row normalised by its max |g| (negated first where ``negate``),
    summed over the gradients."""
    return _histogram_in_torch(grads, rows, negate)


def _histogram_in_torch(grads: list[Tensor], rows: list[int], negate: list[bool]) -> Tensor:
    counts = torch.zeros(NUM_BINS, dtype=torch.int64, device=grads[0].device)
    for grad, row, neg in zip(grads, rows, negate):
        counts += gradient_histogram(-grad if neg else grad, row)
    return counts


histogram.register_kernel("cpu")(_cpu_kernel(cpu_step.histogram, _histogram_in_torch))


@histogram.register_fake
def _histogram_fake(grads, rows, negate) -> Tensor:
    return grads[0].new_empty(NUM_BINS, dtype=torch.int64)


@torch.library.custom_op("gefen::first_gradient_facts", mutates_args=())
def first_gradient_facts(grads: list[Tensor], candidates: list[int], offsets: list[int]) -> Tensor:
    """What Gefen reads off first gradients, as one float64 tensor (one host round trip): for
    each of the T ``grads``, 1.0 where it is finite as fp32, else 0.0; then 1.0 where it holds a
    non-zero element; then the scores of every gradient's candidate periods, concatenated:
    those of ``grads[t]`` are ``candidates[offsets[t]:offsets[t + 1]]``."""
    return _first_gradient_facts_in_torch(grads, candidates, offsets)


def _first_gradient_facts_in_torch(
    grads: list[Tensor], candidates: list[int], offsets: list[int]
) -> Tensor:
    # A tensor's min and max (one pass, no copy, no sum that could overflow) are both finite
    # exactly when every element is, and both zero exactly when every element is.
    device = grads[0].device
    extremes = torch.stack([
        torch.stack(torch.aminmax(g.detach())).double().to(device) if g.numel()
        else torch.zeros(2, dtype=torch.float64, device=device)
        for g in grads
    ])
    # Finite as fp32, where the codebook's histogram normalises them: a float64 gradient
    # beyond fp32's range would overflow there.
    return torch.cat([
        torch.isfinite(extremes.float()).all(dim=1).double(),
        (extremes != 0).any(dim=1).double(),
        *(tensor_period_scores(g, candidates[a:b])
          for g, a, b in zip(grads, offsets, offsets[1:]) if a < b),
    ])


first_gradient_facts.register_kernel("cpu")(
    _cpu_kernel(cpu_step.first_gradient_facts, _first_gradient_facts_in_torch)
)


@first_gradient_facts.register_fake
def _first_gradient_facts_fake(grads, candidates, offsets) -> Tensor:
    return grads[0].new_empty(2 * len(grads) + len(candidates), dtype=torch.float64)


@torch.library.custom_op("gefen::momentum_", mutates_args=("codes", "magnitude"))
def momentum_(grad: Tensor, codes: Tensor, magnitude: Tensor, block: int, codebook: Tensor,
              lut: Tensor, bounds: Tensor, first_index: Tensor, lut_half: int,
              beta: float, nesterov: bool) -> Tensor:
    """GefenMuon's momentum step (kernels/momentum.py) of one matrix's flat ``codes`` and
    ``magnitude`` from ``grad``, with momentum ``beta``; codebook .. lut_half are the fields of
    a ``codebook.LookupTables``. Returns the update (bfloat16, ``grad``'s shape)."""
    tables = LookupTables(codebook, lut, bounds, first_index, lut_half)
    return momentum.momentum_step(grad, codes, magnitude, block=block, tables=tables,
                                  momentum=beta, nesterov=nesterov)


@momentum_.register_fake
def _momentum_fake(grad, codes, magnitude, block, codebook, lut, bounds, first_index, lut_half,
                   beta, nesterov) -> Tensor:
    return torch.empty_like(grad, dtype=torch.bfloat16)


def flat_candidates(lists: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Concatenated candidate lists and their offsets, as ``first_gradient_facts`` takes them."""
    offsets = [0]
    for c in lists:
        offsets.append(offsets[-1] + len(c))
    return [p for c in lists for p in c], offsets
