"""The examples' corpus: source files of the Python standard library, which ship with every
CPython, so the examples need no download."""

from __future__ import annotations

import sysconfig
from pathlib import Path


def read_stdlib_files(names: tuple[str, ...], example: str) -> list[bytes]:
    """The bytes of each standard-library file in ``names`` (paths relative to the stdlib), or a
    clear error naming ``example`` when this Python ships without them."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    missing = [name for name in names if not (stdlib / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{example}: {', '.join(missing)} not found under {stdlib}; this Python ships its "
            "standard library without .py sources (some slim distributions strip them), so run "
            "the example with a Python that has them"
        )
    return [(stdlib / name).read_bytes() for name in names]
