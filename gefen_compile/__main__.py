"""``python -m gefen_compile [--quiet] [--variant published] script.py ARGS...`` (or
``gefen-run script.py ARGS...``):
run an unmodified training script with :func:`~gefen_compile.patch_adamw` and
:func:`~gefen_compile.patch_muon` applied, so every ``torch.optim.AdamW`` it builds or steps is
Gefen, and every ``torch.optim.Muon`` GefenMuon. ``-m module ARGS...`` runs a module instead,
as ``python -m`` does; ``-m torch.distributed.run ...`` (torchrun) runs every worker under the
runner. The script sees its own arguments in ``sys.argv``; its exit code is the runner's. Each
conversion prints one line on stderr unless ``--quiet`` or the script configured logging, and
processes the script starts run the same way (runner.py)."""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from .runner import TORCHRUN, run_patched, run_torchrun
from .variant import VARIANT_NAMES

_USAGE = ("python -m gefen_compile [--quiet] [--variant {robust,published}] "
          "[-m module | script.py] [ARGS...]")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the runner and of the ``gefen-run`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="gefen-run", usage=_USAGE,
        description="Run a PyTorch script with torch.optim.AdamW replaced by Gefen and "
                    "torch.optim.Muon by GefenMuon (gefen_compile.patch_adamw(), patch_muon()).",
    )
    parser.add_argument("--quiet", action="store_true",
                        help="print nothing about the optimizers converted")
    parser.add_argument("--variant", choices=VARIANT_NAMES, default="robust",
                        help="Gefen's variant: the robust default, or the published method")
    parser.add_argument("-m", dest="module", help="run a library module as a script")
    # The runner's options come first; everything from the script (or -m's module) on is the
    # script's, even what looks like an option (argparse's REMAINDER would take it as ours).
    ours = _runner_options(argv)
    args = parser.parse_args(argv[:ours])
    target = argv[ours:]
    if args.module is None and not target:
        parser.error("give the script to run: " + _USAGE)
    run_patched(args.quiet, args.variant)
    if args.module == TORCHRUN:
        run_torchrun(target, args.quiet, args.variant)
    elif args.module is not None:
        sys.argv = [args.module, *target]
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    else:
        script, *script_args = target
        if not os.path.isfile(script):
            parser.error(f"no such script: {script!r}")
        sys.argv = [script, *script_args]
        # As `python script.py` does: the script's directory comes first on the import path.
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, run_name="__main__")


def _runner_options(argv: list[str]) -> int:
    """How many leading items of ``argv`` are the runner's own options."""
    i = 0
    while i < len(argv) and (argv[i] in ("--quiet", "-h", "--help", "-m", "--variant")
                             or argv[i].startswith("--variant=")):
        if argv[i] == "-m":
            return min(i + 2, len(argv))
        i += 2 if argv[i] == "--variant" else 1
    return min(i, len(argv))


if __name__ == "__main__":
    main()
