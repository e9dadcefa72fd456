"""Counting the tensors torch allocates, for tests that must show AdamW's state never exists."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class Allocations(TorchDispatchMode):
    """Records every tensor an op returns in new storage (not a view or an in-place result):
    ``(op, shape, dtype, bytes)``. Kernels outside the dispatcher (gefen's C code) allocate
    through torch only where they return tensors, so those are seen too."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, tuple, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.records.append((str(func), tuple(t.shape), t.dtype,
                                     t.untyped_storage().nbytes()))
        return out

    def total(self) -> int:
        return sum(r[3] for r in self.records)

    def largest_float(self) -> tuple | None:
        floats = [r for r in self.records if r[2].is_floating_point]
        return max(floats, key=lambda r: r[3], default=None)
