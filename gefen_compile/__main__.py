"""``python -m gefen_compile script.py ARGS...`` (or ``gefen-run script.py ARGS...``): run an
unmodified training script with :func:`~gefen_compile.patch_adamw` applied, so every
``torch.optim.AdamW`` it builds is Gefen. ``-m module ARGS...`` runs a module instead, as
``python -m`` does. The script sees its own arguments in ``sys.argv``; its exit code is the
runner's."""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from .patch import patch_adamw

_USAGE = "python -m gefen_compile [-m module | script.py] [ARGS...]"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the runner and of the ``gefen-run`` console script."""
    parser = argparse.ArgumentParser(
        prog="gefen-run", usage=_USAGE,
        description="Run a PyTorch script with torch.optim.AdamW replaced by Gefen "
                    "(gefen_compile.patch_adamw()).",
    )
    parser.add_argument("-m", dest="module", help="run a library module as a script")
    parser.add_argument("target", nargs=argparse.REMAINDER, help="script.py and its arguments")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.module is None and not args.target:
        parser.error("give the script to run: " + _USAGE)
    patch_adamw()
    if args.module is not None:
        sys.argv = [args.module, *args.target]
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        return
    script, *script_args = args.target
    if not os.path.isfile(script):
        parser.error(f"no such script: {script!r}")
    sys.argv = [script, *script_args]
    # As `python script.py` does: the script's directory comes first on the import path.
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
