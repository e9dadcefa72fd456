"""``@eager``: ``torch._dynamo.disable``, applied at the first call instead of at import.

Importing ``torch._dynamo`` takes about a second, which every process importing gefen_compile
would pay (a runner's child processes too), while only a process that compiles needs it; by
then it is imported, and a compiled region calling an ``@eager`` function breaks its graph
there and runs the function eagerly, as under ``torch._dynamo.disable``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, always run eagerly (never traced by dynamo)."""
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not disabled:
            import torch._dynamo

            disabled.append(torch._dynamo.disable(fn))
        return disabled[0](*args, **kwargs)

    return call
