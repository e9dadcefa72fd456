"""``memory_report``: what a Gefen (or GefenMuon) optimizer's state costs, per tensor, against
the optimizer it stands in for: AdamW (Muon)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .distributed import local
from .kernels import native
from .state import adamw_state_nbytes, state_nbytes


@dataclass(frozen=True)
class TensorMemory:
    """One parameter's row of a :class:`MemoryReport`."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    numel: int
    period: int | None  # None until the parameter's first gradient
    gefen_bytes: int
    baseline_bytes: int  # what the baseline optimizer (MemoryReport.baseline) would hold


@dataclass(frozen=True)
class MemoryReport:
    """Optimizer-state bytes of every parameter; ``str()`` renders a table."""

    tensors: tuple[TensorMemory, ...]
    # Which C step (instruction-set path and rows) CPU parameters take, to attribute timings;
    # None when no parameter is on the CPU.
    cpu_step: str | None = None
    # The optimizer Gefen stands in for: AdamW (exp_avg, exp_avg_sq, step), or for GefenMuon,
    # Muon (momentum_buffer).
    baseline: str = "AdamW"

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def gefen_bytes(self) -> int:
        return sum(t.gefen_bytes for t in self.tensors)

    @property
    def baseline_bytes(self) -> int:
        return sum(t.baseline_bytes for t in self.tensors)

    @property
    def gefen_bytes_per_param(self) -> float:
        return self.gefen_bytes / max(self.numel, 1)

    @property
    def baseline_bytes_per_param(self) -> float:
        return self.baseline_bytes / max(self.numel, 1)

    @property
    def adamw_bytes_per_param(self) -> float:
        """``baseline_bytes_per_param``: AdamW's, in a report on Gefen."""
        return self.baseline_bytes_per_param

    def __str__(self) -> str:
        target = "GefenMuon" if self.baseline == "Muon" else "Gefen"
        header = ("tensor", "shape", "dtype", "period", f"{target} bytes", f"{self.baseline} bytes")
        rows = [
            (
                t.name,
                "x".join(map(str, t.shape)) or "scalar",
                str(t.dtype).removeprefix("torch."),
                "-" if t.period is None else str(t.period),
                f"{t.gefen_bytes:,}",
                f"{t.baseline_bytes:,}",
            )
            for t in self.tensors
        ]
        rows.append(("total", f"{self.numel:,} params", "", "", f"{self.gefen_bytes:,}",
                     f"{self.baseline_bytes:,}"))
        rows.append(("bytes/param", "", "", "", f"{self.gefen_bytes_per_param:.3f}",
                     f"{self.baseline_bytes_per_param:.3f}"))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        left = {0, 1, 2}
        lines = []
        for r in [header, None, *rows]:
            if r is None:
                lines.append("  ".join("-" * w for w in widths))
                continue
            cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
            lines.append("  ".join(cells).rstrip())
        pending = sum(t.period is None for t in self.tensors)
        if pending:
            lines.append(f"({pending} tensor(s) have had no gradient yet and hold no state)")
        if self.cpu_step:
            lines.append(f"CPU step: {self.cpu_step}")
        return "\n".join(lines)


def memory_report(optimizer: torch.optim.Optimizer) -> MemoryReport:
    """Per-tensor shape, period and optimizer-state bytes of a Gefen ``optimizer``, with what
    ``torch.optim.AdamW`` would hold for the same parameters (for a GefenMuon: what
    ``torch.optim.Muon``'s momentum buffers would). For DTensor (FSDP2) parameters: this
    rank's shards. A wrapper holding the optimizer (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``) is looked through; any other optimizer is refused."""
    from .muon import GefenMuon

    optimizer = _gefen_inside(optimizer)
    muon = isinstance(optimizer, GefenMuon)
    rows = []
    for gi, group in enumerate(optimizer.param_groups):
        names = group.get("param_names") or [f"group{gi}.param{i}" for i in range(len(group["params"]))]
        for name, param in zip(names, group["params"]):
            state = optimizer.state.get(param, {})
            p = local(param)
            rows.append(
                TensorMemory(
                    name=name,
                    shape=tuple(p.shape),
                    dtype=p.dtype,
                    numel=p.numel(),
                    period=state.get("period"),
                    gefen_bytes=state_nbytes(state),
                    baseline_bytes=p.nbytes if muon else adamw_state_nbytes(p),
                )
            )
    on_cpu = any(local(p).device.type == "cpu" for g in optimizer.param_groups for p in g["params"])
    return MemoryReport(tuple(rows), native.describe() if on_cpu else None,
                        "Muon" if muon else "AdamW")


def _gefen_inside(optimizer: object) -> torch.optim.Optimizer:
    """The Gefen (GefenMuon) optimizer that ``optimizer`` is or wraps, else a TypeError: a
    report of another optimizer's state would count none of it, and read as Gefen's."""
    from .learned_state import LearnedState

    held = inner = optimizer
    for _ in range(8):  # wrappers of wrappers, never a cycle
        if isinstance(held, LearnedState):
            return held
        inner = held
        held = getattr(held, "optimizer", None) or getattr(held, "_optimizer", None)
        if held is None:
            break
    what = (f"{type(optimizer).__name__} is not a Gefen or GefenMuon optimizer" if inner is optimizer
            else f"{type(optimizer).__name__} wraps {type(inner).__name__}, not a Gefen or "
                 "GefenMuon optimizer")
    why = ("the patch left it as it is, saying why in a WARNING on the gefen_compile logger (an "
           "option Gefen does not support, or a step() with an update of its own)"
           if getattr(inner, "_gefen_left_alone", False) else
           "if it should have been converted: build it while gefen_compile.patch_adamw() is in "
           "effect (or under python -m gefen_compile), or convert it with "
           "gefen_compile.convert(optimizer)")
    raise TypeError(f"memory_report: {what}, so there is no Gefen state to report; {why}")
