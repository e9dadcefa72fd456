"""The C library's sources and their digest: setup.py builds the digest into the library, and
kernels/native.py refuses a library whose digest is not that of the sources beside it.

A checkout's library is built in place once (``pip install -e .``); after a pull that changes
the C sources it is stale until rebuilt, and a stale library reads the argument structures of
another version: memory it should not touch, parameters it should not write. Standard library
only: setup.py loads this file before the package (or torch) can be imported."""

from __future__ import annotations

import hashlib
from pathlib import Path

# The library's translation units, in the order they are compiled.
SOURCES = ("cpu_step.c", "codebook_dp.c")


def digest(folder: Path) -> str | None:
    """The digest of the sources in ``folder`` (16 hex digits), or None where one is missing (an
    install from a wheel holds the library and not its sources)."""
    hashed = hashlib.sha256()
    for name in SOURCES:
        try:
            hashed.update((folder / name).read_bytes())
        except OSError:  # not there, or not readable: nothing to compare with
            return None
        hashed.update(b"\0")
    return hashed.hexdigest()[:16]
