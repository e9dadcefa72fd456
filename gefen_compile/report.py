"""What the runner says: one line on stderr per conversion, unless the user configured logging
(then the INFO record on the ``gefen_compile`` logger is theirs to show) or asked for quiet."""

from __future__ import annotations

import logging
import sys

from .convert import LISTENERS, Conversion


def report_conversions(on: bool = True) -> None:
    """Print every conversion from now on (once, however often this is called); ``on=False``:
    stop."""
    if on and _print not in LISTENERS:
        LISTENERS.append(_print)
    elif not on and _print in LISTENERS:
        LISTENERS.remove(_print)


def _print(conversion: Conversion) -> None:
    if logging.getLogger().handlers or logging.getLogger("gefen_compile").handlers:
        return
    # One write of the whole line: workers of one launch share stderr, and print() writes the
    # text and its newline separately, so their lines ran together.
    sys.stderr.write(f"gefen_compile: {conversion}\n")
    sys.stderr.flush()
