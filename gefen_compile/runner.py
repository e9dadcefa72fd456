"""What makes a process run patched under the runner, and every Python process it starts too.

The runner (``python -m gefen_compile``) patches AdamW and Muon, reports conversions on stderr,
sets ``GEFEN_COMPILE_RUNNER`` in the environment and puts ``startup/`` first on
``PYTHONPATH``: every Python process started from then on, by whatever means (``subprocess``
with ``sys.executable``, as accelerate's launcher and Lightning's DDP launcher do; torchrun's
workers; ``multiprocessing``'s spawn and forkserver), runs ``startup/sitecustomize.py`` at
startup, which calls :func:`enter_child` once the process has imported torch. Forked processes
inherit the patched interpreter as it is.
"""

from __future__ import annotations

import os

from .patch import patch_adamw, patch_muon
from .report import report_conversions

ENV = "GEFEN_COMPILE_RUNNER"  # "report" or "quiet"
VARIANT_ENV = "GEFEN_COMPILE_VARIANT"
STARTUP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "startup")


def run_patched(quiet: bool, variant: str = "robust") -> None:
    """Set this process up as the runner does: the patches (converting to ``variant``), the
    report (unless ``quiet``), and both passed on to the processes it starts."""
    patch_adamw(variant=variant)
    patch_muon(variant=variant)
    report_conversions(not quiet)  # quiet: also where a reporting parent's setup came first
    os.environ[ENV] = "quiet" if quiet else "report"
    os.environ[VARIANT_ENV] = variant
    _start_python_patched()


def enter_child() -> None:
    """Set up a Python process started under the runner, as soon as it has imported torch
    (startup/sitecustomize.py calls it)."""
    mode = os.environ.get(ENV)
    if mode is not None:
        run_patched(quiet=mode == "quiet", variant=os.environ.get(VARIANT_ENV, "robust"))


def _start_python_patched() -> None:
    """Put ``startup/`` first on ``PYTHONPATH`` (once), for the processes started from here;
    the rest is kept as it was, empty entries (the working directory) included."""
    paths = os.environ.get("PYTHONPATH", "")
    if STARTUP not in paths.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join([STARTUP, paths]) if paths else STARTUP
