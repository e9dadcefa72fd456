"""``optimizer.state`` for Gefen: a table that notes when the state the flat buckets hold is
replaced, so that the next step rebuilds the buckets from it rather than ignoring it.

The buckets (state.py) hold each parameter's state in flat buffers that the entries of
``optimizer.state[p]`` view. Writing *into* those views needs nothing; assigning a new tensor
(``opt.state[p]["vmean"] = t``), replacing or removing an entry, would otherwise leave the
kernels updating the old buffers while ``state_dict()`` saved the new tensor. Both classes set
one shared :class:`Changes` flag on such a change; the step reads that flag once (no
per-parameter work). The flag is a plain object the optimizer holds, not an attribute of the
table: under torch.compile, reading the table would make dynamo guard on its keys.

Both pickle and deep-copy as a plain ``defaultdict``/``dict``: checkpoints and copies never
hold these classes, and the optimizer wraps its state again when it next builds its buckets.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

# The entry keys that the buckets hold (state.py): a new value for any of these changes them.
BUCKET_KEYS = frozenset(("codes", "magnitude", "vmean", "step", "period"))
# What AdamW (and Muon) keep per parameter and Gefen does not: reading one says where they went.
_OTHER_OPTIMIZERS_KEYS = frozenset(("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"))


class Changes:
    """Whether the state held by an optimizer's buckets was replaced since they were built."""

    def __init__(self) -> None:
        self.changed = True


class StateTable(defaultdict):
    """``optimizer.state``: ``changes.changed`` is set when an entry is replaced or removed, or
    when a bucket key of an entry is (:class:`ParamState`)."""

    def __init__(self, entries: Any, changes: Changes) -> None:
        super().__init__(None, entries)
        self.changes = changes

    def __missing__(self, param: Any) -> ParamState:
        # An empty entry changes no bucket: inserted without marking the table changed.
        entry = ParamState({}, self.changes)
        dict.__setitem__(self, param, entry)
        return entry

    def __setitem__(self, param: Any, entry: Any) -> None:
        self.changes.changed = True
        super().__setitem__(param, entry)

    def __delitem__(self, param: Any) -> None:
        self.changes.changed = True
        super().__delitem__(param)

    def pop(self, *args: Any) -> Any:
        self.changes.changed = True
        return super().pop(*args)

    def popitem(self) -> tuple:
        self.changes.changed = True
        return super().popitem()

    def clear(self) -> None:
        self.changes.changed = True
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.changes.changed = True
        super().update(*args, **kwargs)

    def setdefault(self, param: Any, default: Any = None) -> Any:
        self.changes.changed = True
        return super().setdefault(param, default)

    def __reduce__(self) -> tuple:
        return defaultdict, (dict,), None, None, iter(self.items())


class ParamState(dict):
    """One parameter's entry of a :class:`StateTable`: assigning or removing a bucket key
    (:data:`BUCKET_KEYS`) marks the table's :class:`Changes`; other keys do not."""

    __slots__ = ("changes",)

    def __init__(self, entry: dict, changes: Changes) -> None:
        super().__init__(entry)
        self.changes = changes

    def __missing__(self, key: str) -> Any:
        if key in _OTHER_OPTIMIZERS_KEYS:  # logging code written for AdamW or Muon, say
            raise KeyError(
                f"{key!r}: this optimizer is gefen_compile's, which keeps no {key}: the first "
                "moment (Muon's momentum) is 'codes' (uint8, one per element) times the block's "
                "'magnitude', Gefen's second moment 'vmean', one per block; for a Gefen, "
                "gefen_compile.adamw_state_dict(optimizer)['state'] gives AdamW's exp_avg and "
                "exp_avg_sq, dequantised, keyed as in optimizer.state_dict()"
            )
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        # The same object again is no change (dynamo's optimizer tracing reassigns
        # state["step"] = state["step"].to(p.device), the same tensor).
        if key in BUCKET_KEYS and dict.get(self, key) is not value:
            self.changes.changed = True
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        if key in BUCKET_KEYS:
            self.changes.changed = True
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        if key in BUCKET_KEYS and key in self:
            self.changes.changed = True
        return super().pop(key, *default)

    def popitem(self) -> tuple:
        self.changes.changed = True
        return super().popitem()

    def clear(self) -> None:
        self.changes.changed = True
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __ior__(self, other: Any) -> ParamState:
        self.update(other)
        return self

    def __reduce__(self) -> tuple:
        return dict, (dict(self),)


def tracked(table: Any, changes: Changes) -> StateTable:
    """``table`` (``optimizer.state``) as a :class:`StateTable` reporting to ``changes`` (the
    optimizer's, kept for its lifetime), every entry a :class:`ParamState` of it; only what is
    not yet is wrapped."""
    if not (isinstance(table, StateTable) and table.changes is changes):
        table = StateTable(table, changes)
    for param, entry in table.items():
        if type(entry) is not ParamState or entry.changes is not table.changes:
            dict.__setitem__(table, param, ParamState(entry, table.changes))
    return table
