"""``GefenMuon``: ``torch.optim.Muon`` with its momentum in ~1 byte per parameter.

Muon's update, with the momentum buffer stored as Gefen stores its first moment: uint8 codes
into the learned 256-entry codebook times one magnitude per block of the inferred period (the
variant's block for period 1). Per 2-D parameter with gradient g, in fp32 (fp64 for fp64
parameters), ``mu`` the momentum:

```
m   <- codebook[codes] * magnitude                      # dequantise (per block)
m   <- mu * m + (1 - mu) * g                            # Muon: buf.lerp_(g, 1 - mu)
magnitude <- max_over_block(|m|)                        # stored in the gradient's dtype
codes     <- nearest(codebook, m / magnitude)           # as Gefen (GEFEN_SPEC "One step")
m_q <- codebook[codes] * magnitude
u   <- mu * m_q + (1 - mu) * g   if nesterov else m_q   # Muon: g.lerp(buf, mu)
u   <- bfloat16(u)                                      # where Muon's Newton-Schulz starts
O   <- newton_schulz(u)                                 # orthogonalise.py, as torch.optim.Muon
p   <- p * (1 - lr * weight_decay)
p   <- p - lr * lr_ratio(adjust_lr_fn, p.shape) * O
```

Codebook and periods are learned at the first step from the first gradients, as Gefen learns
them (learned_state.py), with the same two variants.

Under FSDP2 (DTensor parameters) each rank keeps the codes and magnitudes of its shard, computes
its shard of ``u``, and all-gathers ``u`` (bfloat16, half the bytes of an fp32 gather) to
orthogonalise the whole matrix, as the Newton-Schulz iteration needs; every rank then updates
its own shard. ``torch.optim.Muon`` runs the same iteration on DTensors, whose matrix products
gather the operands implicitly: the same full-matrix work on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from . import checkpoint, distributed, ops
from .eager import eager
from .kernels import readable
from .learned_state import LearnedState, place
from .migrate import check_saved_moments, migrate_muon_state
from .orthogonalise import ADJUST_LR_FNS, EPS, NS_COEFFICIENTS, NS_STEPS, lr_ratio, newton_schulz
from .state import Bucket, build_bucket, compute_dtype
from .state_checks import MOMENTUM_KEYS, checked_gradient, entry_problem, moved
from .variant import ROBUST, Variant, variant_named

# Muon's own limit (torch.optim.Muon raises it at the first step; checked here when built).
MAX_NS_STEPS = 100


class GefenMuon(LearnedState, Optimizer):
    """Muon with ~1 byte of momentum state per parameter (the authors' GefenMuon).

    Same constructor, defaults, param-group keys and update as ``torch.optim.Muon``; the
    momentum buffer is replaced by codes into a learned codebook and block magnitudes (module
    docstring). Like Muon it takes 2-D parameters only: optimise matrices with GefenMuon and
    the rest (embeddings, biases, norms) with ``gefen_compile.Gefen`` or AdamW.

    ``variant``: ``"robust"`` (the default) or ``"published"``, as for ``Gefen``.
    """

    _name = "GefenMuon"

    @staticmethod
    def _check_group(values: dict[str, Any], where: str, edited: bool = False) -> None:
        check_muon_hyperparameters(values, where, edited)

    @staticmethod
    def _check_param(p: Tensor, where: str) -> None:
        check_matrix(p, where)

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        *,
        variant: str = ROBUST.name,
    ) -> None:
        self.variant: Variant = variant_named(variant, "GefenMuon")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        check_muon_hyperparameters(defaults, "GefenMuon")
        self._set_codebook(None)
        self._buckets: list[Bucket] | None = None  # built when a parameter gets state
        super().__init__(params, defaults)

    @torch.no_grad()
    def _update(self, closure: Callable[[], float] | None) -> float | None:
        # Apart from ``step`` (wrapped with the step hooks), so a converted Muon runs it from
        # its hook.
        loss = self._loss_of(closure)
        self._check_edited_groups()
        stepping = [
            (group, p, self._checked_grad(p, gi, pi))
            for gi, group in enumerate(self.param_groups)
            for pi, p in enumerate(group["params"])
            if p.grad is not None
        ]
        stateful = ([(group, p, g) for group, p, g in stepping if self.state.get(p)]
                    if self._codebook_histogram is not None else [])
        fresh = [(group, p, g) for group, p, g in stepping if not self.state.get(p)]
        if fresh and distributed.is_state_materialising_step(
                self.param_groups, [g for _, _, g in fresh]):
            distributed.warn_unloadable([p for _, p, _ in fresh], self._name)
        elif fresh:
            self._initialise(fresh)
        if stateful:  # after new parameters learned from their first gradients
            self._relearn_provisional(stateful)
        if self._buckets is None and self.codebook is not None:
            self._buckets = self._build_buckets()
        for group, p, g in stepping:
            state = self.state.get(p)
            if state:
                if "codes" not in state or "magnitude" not in state:  # the user's doing
                    self._check_entry(state, p, "GefenMuon: optimizer.state of",
                                      "load a state_dict, or delete the whole entry")
                self._step_parameter(group, p, g, state)
        return loss

    @eager  # host work: one round trip, the codebook's DP
    def _initialise(self, fresh: list[tuple[dict, Tensor, Tensor]]) -> None:
        if self._learn(fresh):
            self._buckets = None  # rebuilt with the new parameters' state

    def _build_buckets(self) -> list[Bucket]:
        """Flat codes and magnitudes of every parameter with state, one bucket per (device,
        dtype), each entry's tensors views into them."""
        members: dict[tuple, list] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    if "codes" in state:
                        self._check_entry(state, p, "GefenMuon: optimizer.state of",
                                          "if the parameter changed since its state was made "
                                          "(model.to(dtype), p.data = ...), build the "
                                          "optimizer again; else assign codes and magnitude of "
                                          "the shape and dtype GefenMuon keeps, or load a "
                                          "state_dict")
                    members.setdefault((distributed.local(p).device, p.dtype), []).append(
                        (p, gi, state))
        return [
            build_bucket([distributed.local(p) for p, _, _ in m], [gi for _, gi, _ in m],
                         [s for _, _, s in m], dtype, self.variant,
                         owners=[p for p, _, _ in m], second_moments=False)
            for (_, dtype), m in members.items()
        ]

    def _step_parameter(self, group: dict, p: Tensor, grad: Tensor, state: dict) -> None:
        """Muon's update of one parameter from its quantised momentum (module docstring)."""
        local = distributed.local(p)
        built = (state["magnitude"].dtype, state["codes"].numel())
        if (grad.dtype, grad.numel()) != built:
            raise ValueError(
                f"GefenMuon: {self._locate(p)} has a gradient of dtype {grad.dtype} with "
                f"{grad.numel()} elements, but its state was built for {built[0]} and "
                f"{built[1]} (the parameter or its gradient changed after its first step: "
                "model.to(dtype), p.data = ...); build the optimizer again after changing the "
                "model, or keep the gradients' dtype and size as they were"
            )
        if grad.device != state["codes"].device:
            raise moved(f"GefenMuon: {self._locate(p)}", grad.device, state["codes"].device)
        n = state["codes"].numel()
        block = self.variant.magnitude_block(n, state["period"])
        if state["magnitude"].numel() != -(-n // block) or state["codes"].dtype != torch.uint8:
            self._check_entry(state, p, "GefenMuon: optimizer.state of",  # the user's doing
                              "load a state_dict, or delete the whole entry")
        tables = self._nearest.tables(grad.device, compute_dtype(grad.dtype))
        update = ops.momentum_(
            grad, state["codes"], state["magnitude"], block,
            tables.codebook, tables.lut, tables.bounds, tables.first_index, tables.half,
            group["momentum"], group["nesterov"],
        )
        if distributed.is_sharded(p):
            update = _whole(update.view(local.shape), p)
        ortho = newton_schulz(update.view(p.shape), group["ns_coefficients"], group["ns_steps"],
                              group["eps"])
        if distributed.is_sharded(p):
            ortho = _shard_of(ortho, p)
        lr, weight_decay = group["lr"], group["weight_decay"]
        ratio = lr_ratio(group["adjust_lr_fn"], p.shape)
        if isinstance(lr, Tensor):  # tensor arithmetic: no host sync
            local.mul_(1 - lr * weight_decay)
            local.sub_(ortho.to(local.dtype) * (lr * ratio).to(local.dtype))
        else:
            local.mul_(1 - lr * weight_decay)
            local.add_(ortho, alpha=-(lr * ratio))

    def _checked_grad(self, p: Tensor, gi: int, pi: int) -> Tensor:
        """``p``'s gradient (its local shard for a DTensor), refused with Muon's error where
        Muon refuses it, and where GefenMuon cannot keep state for it."""
        where = place(self.param_groups, gi, pi)
        return readable(checked_gradient(
            p, where, "GefenMuon", f"Muon does not support sparse gradients (GefenMuon, {where})"))

    def _check_entry(self, entry: dict, p: Tensor, source: str, fix: str,
                     variant: Variant | None = None) -> None:
        extra = sorted(set(entry) - set(MOMENTUM_KEYS))
        problem = (f"has {', '.join(map(repr, extra))}, which GefenMuon does not keep (a Gefen "
                   "entry?)" if extra else None)
        problem = problem or entry_problem(entry, distributed.local(p), variant or self.variant,
                                           second_moments=False)
        if problem:
            raise ValueError(f"{source} {self._locate(p)} {problem}; {fix}")

    def _saved(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The state_dict: Muon's layout (``state_dict``) plus ``"codebook"`` (float32, or
        None before the first step) and ``"variant"``. Per-parameter entries hold ``codes``
        (uint8, in the parameter's shape), ``magnitude`` (one per block, the parameter's
        dtype) and ``period``, and under Muon's ``momentum_buffer`` a marker that makes
        ``torch.optim.Muon`` fail at its first step (checkpoint.py). For DTensor (FSDP2)
        parameters, the layout of ``gefen_compile/distributed.py``."""
        params = self._params()
        for key, entry in state_dict["state"].items():
            if entry and not distributed.is_sharded(params[key]):
                state_dict["state"][key] = {**entry,
                                            "codes": entry["codes"].view(params[key].shape)}
        state_dict = self._with_codebook(state_dict)
        return checkpoint.muon_for_saving(distributed.sharded_state_dict(
            self._params(), state_dict, type(self).__name__, with_step=False))

    def _local_saved(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A saved state_dict in the single-process layout, this rank's state."""
        return distributed.local_state_dict(self._params(), checkpoint.muon_from_saved(state_dict),
                                           type(self).__name__, self.variant.name)

    def _check_saved_groups(self, saved_groups: list[dict]) -> None:
        """Muon's (GefenMuon's) keys and valid values in every saved group: what the
        constructor checks, and a state_dict of another optimizer refused."""
        for i, group in enumerate(saved_groups):
            where = f"GefenMuon.load_state_dict: saved param group {i}"
            missing = [k for k in self.defaults if k not in group]
            if missing:
                raise ValueError(
                    f"{where} has no {', '.join(map(repr, missing))}, so it was not saved by "
                    "GefenMuon or torch.optim.Muon; load it into the optimizer that saved it"
                )
            check_muon_hyperparameters(group, where)

    def _load_original(self, state_dict: dict[str, Any]) -> None:
        """A ``torch.optim.Muon`` checkpoint: loaded as Muon loads it, then its momentum
        buffers quantised (``gefen_compile.convert`` does the same to a live Muon)."""
        if not all("momentum_buffer" in e for e in state_dict["state"].values() if e):
            raise ValueError(
                "GefenMuon.load_state_dict: this state_dict has no 'codebook' and is not "
                "Muon's (a momentum_buffer per parameter), so it was not saved by "
                "GefenMuon.state_dict(); load it into the optimizer that saved it"
            )
        check_saved_moments(self, state_dict, ("momentum_buffer",))
        Optimizer.load_state_dict(self, state_dict)
        self._set_codebook(None)
        migrate_muon_state(self)


def check_muon_hyperparameters(values: dict[str, Any], where: str, edited: bool = False) -> None:
    """Raise ``torch.optim.Muon``'s error for invalid ``values`` (a param group, or the
    constructor's defaults), naming ``where``; also what Muon checks only at its first step
    (ns_steps, ns_coefficients). ``edited``: values set since, whose tensors are not read."""
    lr = values["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element ({where}: got shape {tuple(lr.shape)})")
    if not (edited and isinstance(lr, Tensor)) and not 0.0 <= lr:
        raise ValueError(f"Learning rate should be >= 0 but is: {lr} ({where})")
    for key in ("momentum", "weight_decay"):
        if not 0.0 <= values[key]:
            raise ValueError(f"{key.replace('_', ' ')} should be >= 0 but is: {values[key]} "
                             f"({where})")
    if values["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(f"Adjust learning rate function {values['adjust_lr_fn']} is not "
                         f"supported ({where}: use one of {ADJUST_LR_FNS})")
    if not (isinstance(values["ns_steps"], int) and 0 <= values["ns_steps"] < MAX_NS_STEPS):
        raise ValueError(f"Number of steps must be less than {MAX_NS_STEPS} for computational "
                         f"efficiency ({where}: ns_steps={values['ns_steps']!r}; use an int in "
                         f"[0, {MAX_NS_STEPS}), Muon's default is 5)")
    if len(tuple(values["ns_coefficients"])) != 3:
        raise ValueError(f"Coefficients must be a tuple of exactly 3 values ({where}: "
                         f"ns_coefficients={values['ns_coefficients']!r})")


def check_matrix(p: Tensor, where: str) -> None:
    """Refuse what Muon refuses (a parameter that is not 2-D), and non-real parameters."""
    if p.is_complex() or not p.is_floating_point():
        raise TypeError(f"GefenMuon: {where} has dtype {p.dtype}; GefenMuon updates real "
                        "floating-point parameters only: leave this tensor out of the optimizer")
    if p.ndim != 2:
        raise ValueError(
            f"Muon only supports 2D parameters whereas we found a parameter with size: "
            f"{p.size()} (GefenMuon, {where}): give GefenMuon the hidden layers' matrices and "
            "the rest (embeddings, output head, biases, norms, convolutions) to "
            "gefen_compile.Gefen or torch.optim.AdamW, as usual for Muon"
        )


def _whole(update: Tensor, p: Tensor) -> Tensor:
    """The whole matrix of ``update`` (this rank's shard of DTensor ``p``'s update)."""
    return type(p).from_local(update, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride()).full_tensor()


def _shard_of(whole: Tensor, p: Tensor) -> Tensor:
    """This rank's piece of ``whole`` (a matrix of ``p``'s shape), as DTensor ``p`` holds it."""
    from torch.distributed.tensor import Replicate

    mesh = p.device_mesh
    replicated = type(p).from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, p.placements).to_local()
