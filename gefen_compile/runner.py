"""What makes a process run patched under the runner, and the processes it starts too.

The runner (``python -m gefen_compile``) patches AdamW and Muon, reports conversions on stderr, and sets
``GEFEN_COMPILE_RUNNER`` in the environment. Started processes:

- forked ones inherit the patched interpreter as it is;
- spawned ones (``multiprocessing`` with the "spawn" start method, which
  ``torch.multiprocessing.spawn`` uses) run ``python -c "...spawn_main(...)"``: the runner
  prefixes that program with :func:`enter_child`, which sets the child up as the runner did
  (its own children too) before it unpickles and runs the target;
- torchrun (``python -m gefen_compile -m torch.distributed.run ...``) starts its workers as
  ``python -m gefen_compile script.py``, through torchrun's own ``--module`` option.
"""

from __future__ import annotations

import os
import sys

from .patch import patch_adamw, patch_muon
from .report import report_conversions

ENV = "GEFEN_COMPILE_RUNNER"  # "report" or "quiet"
VARIANT_ENV = "GEFEN_COMPILE_VARIANT"
_CHILD = "import gefen_compile.runner as _gefen; _gefen.enter_child(); "
TORCHRUN = "torch.distributed.run"


def run_patched(quiet: bool, variant: str = "robust") -> None:
    """Set this process up as the runner does: the patches (converting to ``variant``), the
    report (unless ``quiet``), and both passed on to the processes it starts."""
    patch_adamw(variant=variant)
    patch_muon(variant=variant)
    if not quiet:
        report_conversions()
    os.environ[ENV] = "quiet" if quiet else "report"
    os.environ[VARIANT_ENV] = variant
    _prefix_spawned_children()


def enter_child() -> None:
    """The first thing a spawned child of a runner's process does (see the module docstring)."""
    mode = os.environ.get(ENV)
    if mode is not None:
        run_patched(quiet=mode == "quiet", variant=os.environ.get(VARIANT_ENV, "robust"))


def _prefix_spawned_children() -> None:
    from multiprocessing import spawn

    original = spawn.get_command_line
    if getattr(original, "gefen_prefixed", False):
        return

    def get_command_line(**kwargs) -> list[str]:
        command = original(**kwargs)
        if "-c" in command:  # not in a frozen executable, which runs no Python program
            i = len(command) - command[::-1].index("-c")
            command[i] = _CHILD + command[i]
        return command

    get_command_line.gefen_prefixed = True
    spawn.get_command_line = get_command_line


def run_torchrun(argv: list[str], quiet: bool, variant: str = "robust") -> None:
    """``torch.distributed.run`` with ``argv``, its workers started under the runner."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import record

    args = torchrun.parse_args(argv)
    if args.no_python:
        raise SystemExit(
            "gefen-run: torchrun --no-python starts the script as a program of its own, which "
            "the runner cannot patch; drop --no-python, or call gefen_compile.patch_adamw() "
            "in the script"
        )
    script = ["-m", args.training_script] if args.module else [args.training_script]
    args.training_script_args = [*(["--quiet"] if quiet else []), "--variant", variant,
                                 *script, *args.training_script_args]
    args.training_script, args.module = "gefen_compile", True
    sys.argv = [TORCHRUN, *argv]
    record(torchrun.run)(args)
