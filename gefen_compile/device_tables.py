"""Small per-step tables (data pointers, hyperparameters) on the device, copied once per
distinct content.

Steps whose tables did not change (the usual case: same gradients buffers, same schedule
position for a tensor lr) copy nothing, and a new table is copied from pinned memory
asynchronously: no host sync, and a copy that a CUDA graph captures replays from a buffer that
stays alive and unchanged.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_CAPACITY = 64


def device_table(
    values: tuple, dtype: torch.dtype, device: torch.device, tag: object = None
) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``, from a cache keyed by content.

    Callers that write into the table they get pass a ``tag`` naming what they write, so that
    table is never handed to a caller expecting the bare content."""
    key = (torch.device(device), dtype, values, tag)
    table = _CACHE.get(key)
    if table is None:
        host = torch.tensor(values, dtype=dtype, device="cpu")  # whatever the default device
        if key[0].type == "cpu":
            table = host
        else:
            table = host.pin_memory().to(device, non_blocking=True)
        _CACHE[key] = table
        if len(_CACHE) > _CAPACITY:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return table


_LAST: OrderedDict[object, tuple[list, torch.Tensor]] = OrderedDict()


def slot_table(
    slot: object, values: list, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``device_table(tuple(values), ...)`` for a caller that asks for the same ``slot`` every
    step (a bucket's pointer table, say): when ``values`` equal the slot's last ones, a list
    comparison returns the last table without building or hashing a key."""
    last = _LAST.get(slot)
    if last is not None and last[0] == values:
        return last[1]
    table = device_table(tuple(values), dtype, device)
    _LAST[slot] = (values, table)
    _LAST.move_to_end(slot)
    if len(_LAST) > _CAPACITY:
        _LAST.popitem(last=False)
    return table

