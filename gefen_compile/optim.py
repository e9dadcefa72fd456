"""``Gefen``: the optimizer, a drop-in for ``torch.optim.AdamW``."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from . import checkpoint, distributed, ops
from .device_tables import device_table
from .eager import eager
from .learned_state import LearnedState, place
from .hyperparameters import check_hyperparameters, scalar_betas
from .kernels import StepInputs, is_readable, prepared, readable
from .kernels.torch_step import gefen_update
from .migrate import check_saved_moments, has_adamw_state, migrate_adamw_state
from .state import Bucket, build_bucket, compute_dtype
from .state_checks import SAVED_ENTRY, check_real, checked_gradient, entry_problem, moved
from .state_table import Changes, tracked
from .variant import ROBUST, Variant, variant_named


class Gefen(LearnedState, Optimizer):
    """AdamW with ~1 byte of optimizer state per parameter (Gefen, arXiv 2606.13894).

    Same constructor, defaults and param-group keys as ``torch.optim.AdamW``. The first
    ``step()`` infers every parameter's period and learns the global 256-entry codebook from the
    first gradients; each step then keeps, per parameter, uint8 codes into that codebook, one
    first-moment magnitude and one second-moment value per block. ``foreach`` and ``fused`` are
    accepted and recorded for drop-in compatibility: they choose among AdamW's implementations
    and Gefen has its own.

    ``variant``: ``"robust"`` (the default) or ``"published"``, the exact method of the paper;
    they differ only where GEFEN_SPEC's "Robust variant" says (variant.py). Saved in
    ``state_dict()`` and restored by ``load_state_dict()``.

    Not supported (an error says so): ``amsgrad=True``, ``differentiable=True``, sparse or
    complex gradients, non-floating parameters.
    """

    _check_group = staticmethod(check_hyperparameters)
    _check_param = staticmethod(check_real)

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        variant: str = ROBUST.name,
    ) -> None:
        self.variant: Variant = variant_named(variant)
        defaults = {
            "lr": lr,
            "betas": scalar_betas(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": True,
        }
        check_hyperparameters(defaults, where="Gefen")
        self._set_codebook(None)
        self._buckets: list[Bucket] | None = None  # built at the first step
        self._index: dict[Tensor, tuple[int, int]] = {}
        self._stateless: list[tuple[int, int, dict, Tensor]] = []  # rebuilt with the buckets
        super().__init__(params, defaults)

    @torch.no_grad()
    def _update(self, closure: Callable[[], float] | None) -> float | None:
        # The step itself, apart from ``step`` (which torch.optim wraps with the step hooks), so
        # that a converted AdamW runs it from a hook.
        loss = self._loss_of(closure)
        self._check_edited_groups()
        found_inf = _unscaled_for_grad_scaler(self)
        # Parameters without state (all of them before the first step; in steady state usually
        # none): only these are scanned, so a step costs no Python work per stateful tensor here.
        # ``changed``: state assigned into optimizer.state (state_table.py) since the last build;
        # another table: optimizer.state itself replaced (a reset, say; seen by eager steps:
        # dynamo reading optimizer.state guards on every gradient, recompiling at each step).
        if (self._buckets is None or self._changes.changed or self._groups_changed()
                or not torch.compiler.is_compiling() and self.state is not self._table):
            self._buckets = self._build_buckets({})
        fresh = [
            (group, p, _checked_grad(p, place(self.param_groups, gi, pi)))
            for gi, pi, group, p in self._stateless
            if p.grad is not None and not self.state.get(p)
        ]
        provisional = self._codebook_histogram is not None
        if found_inf is not None and (fresh or self._nearest is None or provisional):
            # A step that would learn periods or the codebook reads the gradients on the host
            # anyway; a skipped one must learn nothing.
            if found_inf.item():
                return loss
            found_inf = None
        # Small models: while the codebook is thin, the parameters with state and a gradient
        # (listed before new ones get state) teach it again once the step's checks have passed.
        stateful = [(group, p, p.grad) for group in self.param_groups for p in group["params"]
                    if p.grad is not None and self.state.get(p)] if provisional else []
        if fresh and distributed.is_state_materialising_step(
            self.param_groups, [g for _, _, g in fresh]
        ):
            distributed.warn_unloadable([p for _, p, _ in fresh], self._name)
            fresh = []  # nothing to learn from: these parameters stay without state
        if fresh:
            self._initialise(fresh)
        if self._nearest is None:  # every gradient so far was empty: nothing to update
            return loss
        if self._buckets is None:
            self._buckets = self._build_buckets({})
        # Every bucket's tensors are read and checked before any kernel runs: a step refused
        # for one gradient changes nothing.
        steps = []
        for bucket in self._buckets:
            ready = prepared.prepare(bucket)
            if ready is None:
                grads = [p.grad for p in bucket.owners]
                if any(g is not None for g in grads):
                    steps.append((bucket, None, self._checked_grads(bucket, grads)))
            elif ready.grads:
                steps.append((bucket, ready, None))
        if stateful:
            self._relearn_provisional(stateful)
        for bucket, ready, grads in steps:
            if ready is None:
                self._step_bucket(bucket, grads, found_inf)
            else:
                prepared.run_prepared(bucket, ready, self._kernel_args(bucket, [], found_inf))
        return loss

    def _groups_changed(self) -> bool:
        """Whether the param groups hold other parameters than when the buckets were built (a
        group's "params" edited in place, a group appended by hand): one identity pass, ~20 ns
        per parameter."""
        groups = self.param_groups
        return len(groups) != len(self._grouped) or not all(
            len(group["params"]) == len(kept) and all(map(operator.is_, group["params"], kept))
            for group, kept in zip(groups, self._grouped))

    def _checked_grads(self, bucket: Bucket, grads: list[Tensor | None]) -> list[Tensor | None]:
        """``grads`` (local shards for DTensor parameters), after checking that every gradient
        and parameter still has the dtype and size its state was built for: a few attribute
        reads per tensor, no sync. A mismatch is an error naming the parameter, raised before
        any kernel reads memory laid out for the old size or dtype."""
        if bucket.sharded:
            groups = self.param_groups
            grads = [None if g is None else _checked_grad(p, place(groups, *self._index[p]))
                     for p, g in zip(bucket.owners, grads)]
        dtype, strided, device = bucket.dtype, torch.strided, bucket.codes.device
        if [1 for p, g, n in zip(bucket.params, grads, bucket.numels)
                if g is not None and (g.dtype != dtype or p.dtype != dtype or g.layout != strided
                                      or g.numel() != n or p.numel() != n
                                      or p.device != device or g.device != device
                                      or n and not (g.data_ptr() and p.data_ptr()))]:
            for p, owner, g, n in zip(bucket.params, bucket.owners, grads, bucket.numels):
                if g is not None:
                    for tensor in (p, g):  # a gradient moved with .grad.data, say
                        if tensor.device != device:
                            raise moved(f"Gefen: {self._locate(owner)}", tensor.device, device)
                    # sparse, complex, shape
                    _checked_grad(owner, place(self.param_groups, *self._index[owner]))
                    if (g.dtype, p.dtype, g.numel(), p.numel()) != (dtype, dtype, n, n):
                        raise ValueError(
                            f"Gefen: {self._locate(owner)} has dtype {p.dtype} and {p.numel()} "
                            f"elements, its gradient {g.dtype} and {g.numel()}, but its state "
                            f"was built for {dtype} and {n} (the parameter changed after its "
                            "first step: model.to(dtype), p.data = ..., or a gradient of "
                            "another dtype); build the optimizer again after changing the "
                            "model, or keep parameter and gradient dtypes as they were"
                        )
                    for tensor, what in ((p, "parameter"), (g, "gradient")):
                        if n and not tensor.data_ptr():
                            raise ValueError(
                                f"Gefen: the {what} of {self._locate(owner)} has no memory of "
                                "its own (data_ptr() is 0: a tensor subclass without storage, "
                                "an efficient zero tensor, or storage resized to 0), so the "
                                f"kernels cannot {'update' if what == 'parameter' else 'read'} "
                                f"it; give it a plain tensor ({'p.data' if what == 'parameter' else 'p.grad'} "
                                "= torch.zeros_like(...) or a materialised copy)"
                            )
        return grads

    def _step_bucket(self, bucket: Bucket, grads: list[Tensor | None],
                     skip: Tensor | None) -> None:
        """``skip``: see ops.step_ (None: step)."""
        grads = [None if g is None else readable(g) for g in grads]
        if bucket.codes.device.type not in prepared.RUNNERS:  # no kernels: MPS, XPU, ...
            if skip is None or not skip.item():
                self._step_in_torch(bucket, grads)
            return
        # Parameters the kernels cannot update in place (stored in another memory order, as
        # channels_last, negated views, misaligned) are stepped as contiguous copies, then
        # written back: the same bytes as a contiguous twin's, for three copies (the plain
        # torch step they took before cost a channels_last ResNet-18 6.6x as much).
        eager = not torch.compiler.is_compiling()  # see readable()
        stored_apart = [not (is_readable(p) if eager else p.is_contiguous()) for p in bucket.params]
        copies = {i: readable(p) for i, (p, g) in enumerate(zip(bucket.params, grads))
                  if g is not None and stored_apart[i]}
        args = self._kernel_args(bucket, grads, skip)
        if eager:  # the prepared step's from now on, those without a gradient now too
            bucket.copied = tuple(i for i, apart in enumerate(stored_apart) if apart)
        if copies:
            args = args._replace(params=[copies.get(i, p) for i, p in enumerate(args.params)])
        ops.run_step(args)
        for i, copy in copies.items():
            bucket.params[i].copy_(copy)

    def _step_in_torch(self, bucket: Bucket, grads: list[Tensor | None]) -> None:
        """The plain-torch step (kernels/torch_step.py) of a bucket, parameter by parameter."""
        for p, g, owner in zip(bucket.params, grads, bucket.owners):
            if g is None:
                continue
            group = self.param_groups[self._index[owner][0]]
            tables = self._nearest.tables(p.device, compute_dtype(bucket.dtype))
            gefen_update(p, g, self.state[owner], tables.codebook, self._nearest, self.variant,
                         lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                         eps=group["eps"], weight_decay=group["weight_decay"],
                         maximize=group["maximize"])

    def _kernel_args(self, bucket: Bucket, grads: list[Tensor | None],
                     skip: Tensor | None = None) -> StepInputs:
        """The arguments of ``ops.step_`` (and of each kernel) for one bucket."""
        device = bucket.codes.device
        t = self._nearest.tables(device, compute_dtype(bucket.dtype))
        return StepInputs(
            bucket.params, grads, bucket.codes, bucket.magnitude, bucket.vmean, bucket.steps,
            bucket.segments, bucket.num_rows, bucket.param_group,
            hyper_table(self.param_groups, device),
            t.codebook, t.lut, t.bounds, t.first_index, t.half,
            # The CUDA kernel's work plan; the CPU kernels never read one (building it took
            # 5-10 ms of a first step on GPT-2 shapes).
            *(bucket.work_plan() if device.type == "cuda" else ([], [])),
            # Asynchronous only to a GPU: the C step reads a CPU copy at once.
            None if skip is None else skip.to(device, non_blocking=device.type == "cuda"),
        )

    # Host-side work (one host round trip, the codebook's DP), so it runs eagerly when a
    # compiled function steps; the steady-state step around it stays traceable.
    @eager
    def _initialise(self, fresh: list[tuple[dict, Tensor, Tensor]]) -> None:
        """State for parameters seen for the first time (LearnedState._learn), in the flat
        buckets."""
        fresh = self._learn(fresh)
        if fresh:
            warn_half_moments(self, [p for _, p, g in fresh if g.dtype == torch.float16])
            self._buckets = self._build_buckets({p: g.dtype for _, p, g in fresh})

    def _build_buckets(self, new_dtypes: dict[Tensor, torch.dtype]) -> list[Bucket]:
        """Flat state for every parameter with state, one bucket per (device, state dtype);
        ``new_dtypes``: the state dtype of parameters whose state is only a period so far.
        Other entries are checked first: they may hold tensors the user assigned."""
        if getattr(self, "_changes", None) is None:  # also for optimizers converted in place
            self._changes = Changes()
        self.state = self._table = tracked(self.state, self._changes)
        self._index, self._stateless = {}, []
        self._grouped = [tuple(group["params"]) for group in self.param_groups]
        members: dict[tuple, list] = {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                self._index[p] = (gi, pi)
                state = self.state.get(p)
                if not state:
                    self._stateless.append((gi, pi, group, p))
                else:
                    if p not in new_dtypes:
                        self._check_entry(state, p, "Gefen: optimizer.state of",
                                          "if the parameter changed since its state was made "
                                          "(model.to(dtype), p.data = ...), build the "
                                          "optimizer again; else assign tensors of the shape "
                                          "and dtype that Gefen keeps (gefen_compile/state.py),"
                                          " or load a state_dict with load_state_dict")
                    dtype = new_dtypes.get(p) or state["vmean"].dtype
                    members.setdefault((p.device, dtype), []).append((p, gi, state))
        buckets = [
            build_bucket([distributed.local(p) for p, _, _ in m], [gi for _, gi, _ in m],
                         [s for _, _, s in m], dtype, self.variant, owners=[p for p, _, _ in m])
            for (_, dtype), m in members.items()
        ]
        self._changes.changed = False  # the buckets now hold every entry
        return buckets

    def _check_entry(self, entry: dict, p: Tensor, source: str, fix: str,
                     variant: Variant | None = None) -> None:
        """Raise a ValueError naming ``p`` when ``entry`` is not a valid state for it (laid
        out as ``variant``, by default this optimizer's, lays it out)."""
        if isinstance(entry.get("step"), bytes):  # checkpoint.py's marker: the fix differs
            raise ValueError(f"{source} {self._locate(p)} {SAVED_ENTRY}")
        problem = entry_problem(entry, distributed.local(p), variant or self.variant)
        if problem:
            raise ValueError(f"{source} {self._locate(p)} {problem}; {fix}")

    def _saved(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The state_dict: AdamW's (``state_dict``) plus ``"codebook"`` (float32, or None
        before the first step) and ``"variant"`` (its name; a state_dict without one holds
        published state).

        Per-parameter entries hold ``codes`` (in the parameter's shape), ``magnitude``,
        ``vmean``, ``gefen_step`` (the step counter), ``period``, and under ``step`` a marker
        that makes ``torch.optim.AdamW.load_state_dict`` fail with the fix in its message
        (``gefen_compile/checkpoint.py``); for DTensor (FSDP2) parameters, the layout in
        ``gefen_compile/distributed.py``, which ``torch.distributed.checkpoint`` saves and
        restores rank by rank.
        """
        state_dict = self._with_codebook(state_dict)
        state_dict = distributed.sharded_state_dict(self._params(), state_dict, type(self).__name__)
        return checkpoint.for_saving(self._params(), state_dict)

    def _local_saved(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A saved state_dict in the single-process layout, this rank's state."""
        state_dict = checkpoint.from_saved(state_dict)
        return distributed.local_state_dict(self._params(), state_dict, type(self).__name__,
                                           self.variant.name)

    def _check_saved_groups(self, saved_groups: list[dict]) -> None:
        """AdamW's keys and valid values in every saved group: what the constructor checks
        (amsgrad, coupled weight decay), and a state_dict of another optimizer refused."""
        for i, group in enumerate(saved_groups):
            where = f"Gefen.load_state_dict: saved param group {i}"
            missing = [k for k in _SAVED_GROUP_KEYS if k not in group]
            if missing:
                raise ValueError(
                    f"{where} has no {', '.join(map(repr, missing))}, so it was not saved by "
                    "Gefen, torch.optim.AdamW or torch.optim.Adam; load it into the optimizer "
                    "that saved it"
                )
            check_hyperparameters(group, where, saved=True)

    def _load_original(self, state_dict: dict[str, Any]) -> None:
        """An AdamW checkpoint: loaded as AdamW loads it, then migrated to Gefen state."""
        if not all(map(has_adamw_state, state_dict["state"].values())):
            raise ValueError(
                "Gefen.load_state_dict: this state_dict has no 'codebook' and is not "
                "AdamW's (exp_avg, exp_avg_sq, step per parameter), so it was not saved by "
                "Gefen.state_dict() (torch.distributed.checkpoint.state_dict's helpers drop "
                "the codebook for plain parameters: checkpoint optimizer.state_dict() "
                "itself); load it into the optimizer that saved it"
            )
        check_saved_moments(self, state_dict, ("exp_avg", "exp_avg_sq"))
        Optimizer.load_state_dict(self, state_dict)
        self._set_codebook(None)  # learned from the checkpoint's first moments
        migrate_adamw_state(self)
        self._buckets, self._index = None, {}


# What every AdamW and Adam param group has held since torch 1.x (NAdam, RAdam and Adamax
# groups have no amsgrad).
_SAVED_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad")


def _unscaled_for_grad_scaler(optimizer: Optimizer) -> Tensor | None:
    """GradScaler's protocol for optimizers that unscale and skip steps themselves, as fused
    AdamW does (``_step_supports_amp_scaling``, which a converted ``AdamW(fused=True)`` keeps):
    during ``scaler.step(optimizer)`` it sets ``found_inf`` and ``grad_scale`` (None once
    ``unscale_`` ran) instead of unscaling. Divides the gradients by ``grad_scale`` in place,
    as fused AdamW does, and returns ``found_inf`` (non-zero: an inf or nan gradient, skip the
    step), which the kernels read on the device; None outside the protocol."""
    found_inf = getattr(optimizer, "found_inf", None)
    scale = getattr(optimizer, "grad_scale", None)
    if scale is not None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, scale)
    return found_inf


def warn_half_moments(optimizer: Gefen, params: list[Tensor]) -> None:
    """Warn that float16 ``params``, about to get state, get float16 second moments (the state
    dtype is the gradient's, GEFEN_SPEC), in which AdamW's update fails for small gradients."""
    if params:
        more = f" (and {len(params) - 1} more)" if len(params) > 1 else ""
        warnings.warn(
            f"{optimizer._name}: {optimizer._locate(params[0])}{more} is float16, so its second "
            "moments are stored in float16 (the state takes the gradient's dtype, as AdamW's "
            "does): there (1 - beta2) * g^2 loses precision below |g| ~ 0.25 and is 0 below "
            "~5e-3 (beta2 = 0.999), and an element whose second moment is 0 steps by up to "
            "lr * |m| / eps, orders of magnitude more than lr (torch's AdamW keeps float16 "
            "moments too, and fails alike). Train float32 parameters under torch.autocast(dtype="
            "torch.float16) with a GradScaler, or in bfloat16", stacklevel=2)


def _checked_grad(p: Tensor, where: str) -> Tensor:
    return checked_gradient(p, where, "Gefen", (
        f"Gefen does not support sparse gradients ({where}); use torch.optim.SparseAdam for "
        "that parameter, or a dense gradient (nn.Embedding(sparse=False))"))


def hyper_table(groups: list[dict[str, Any]], device: torch.device) -> Tensor:
    """float64 [groups, 6] on ``device``: lr, beta1, beta2, eps, weight_decay, maximize. A
    tensor lr or beta is copied tensor to tensor into its entry (never read on the host: no
    sync), and under torch.compile it stays an input of the graph rather than a constant."""
    if torch.compiler.is_compiling():
        # Built by traced ops, so that a float that changes (a schedule's lr, OneCycleLR's
        # beta1) becomes an input of the graph at its first change, as AdamW's does; a table
        # cached by value would make each value a constant, compiled anew.
        one = torch.ones((), dtype=torch.float64, device=device)
        return torch.stack([torch.stack([
            value.reshape(()).to(device, torch.float64) if isinstance(value, Tensor)
            else one * value for value in _hyper_row(i, group)]) for i, group in enumerate(groups)])
    rows, tensors = [], {}
    for i, group in enumerate(groups):
        row = []
        for column, value in enumerate(_hyper_row(i, group)):
            if isinstance(value, Tensor):  # one element; a shape (1,) lr is AdamW's too
                tensors[i, column] = value.reshape(()) if value.dim() else value
                value = 0.0
            row.append(float(value))
        rows.append(tuple(row))
    # Tables written into are keyed by the tensors' identities too: two optimizers stepping in
    # two threads (the C step releases the GIL) must not write their lrs into one table.
    table = device_table(tuple(rows), torch.float64, device,
                         tag=("tensors", *((*at, id(value)) for at, value in tensors.items())))
    for (i, column), value in tensors.items():  # written on every step: the cache may hold it
        table[i, column].copy_(value, non_blocking=True)
    return table


def _hyper_row(i: int, group: dict[str, Any]) -> tuple:
    """Group i's row of the hyper table, as the group holds it (floats or tensors)."""
    betas = group["betas"]
    if len(betas) != 2:  # a row of another length would shift the kernels' columns
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r} (param group {i})")
    # maximize: its truth, as AdamW reads it ("0" and None included)
    return (group["lr"], betas[0], betas[1], group["eps"], group["weight_decay"],
            float(bool(group["maximize"])))
