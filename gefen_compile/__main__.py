"""``python -m gefen_compile [--quiet] [--variant published] script.py ARGS...`` (or
``gefen-run script.py ARGS...``):
run an unmodified training script with :func:`~gefen_compile.patch_adamw` and
:func:`~gefen_compile.patch_muon` applied, so every ``torch.optim.AdamW`` it builds or steps is
Gefen, and every ``torch.optim.Muon`` GefenMuon. ``-m module ARGS...`` runs a module instead,
as ``python -m`` does (``-m torch.distributed.run ...``: torchrun, its workers patched too). The
script sees its own arguments in ``sys.argv``; its exit code is the runner's. Each
conversion prints one line on stderr unless ``--quiet`` or the script configured logging, and
processes the script starts run the same way (runner.py)."""

from __future__ import annotations

import argparse
import builtins
import io
import os
import runpy
import sys
import types
import zipfile
from importlib.machinery import SourceFileLoader

from .runner import run_patched
from .variant import VARIANT_NAMES

_USAGE = "%(prog)s [--quiet] [--variant {robust,published}] [--] [-m module | script.py] [ARGS...]"


def main(argv: list[str] | None = None) -> None:
    """Entry point of the runner and of the ``gefen-run`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    # Errors name the runner as it was started: `gefen-run` (the console script) or the module.
    started_as = os.path.basename(sys.argv[0])
    parser = argparse.ArgumentParser(
        prog="gefen-run" if started_as.startswith("gefen-run") else "python -m gefen_compile",
        usage=_USAGE,
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
    args = parser.parse_args([a for a in argv[:ours] if a != "--"])
    target = argv[ours:]
    if args.module is None and not target:
        parser.error("give the script to run: " + _USAGE % {"prog": parser.prog})
    run_patched(args.quiet, args.variant)
    if args.module is not None:
        sys.argv = [args.module, *target]
        _set_path0(os.getcwd())  # as `python -m` does (already so under `python -m gefen_compile`)
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    else:
        script, *script_args = target
        if not os.path.isfile(script):
            parser.error(f"no such script: {script!r}")
        sys.argv = [script, *script_args]  # sys.argv[0] as typed, as `python script.py` has it
        _set_path0(os.path.dirname(os.path.realpath(script)))
        if script.endswith(".pyc") or zipfile.is_zipfile(script):
            runpy.run_path(script, run_name="__main__")
        else:
            _run_source(script)


def _set_path0(entry: str) -> None:
    """Put ``entry`` first on ``sys.path`` in place of the entry the interpreter put there for
    the runner (the working directory under ``python -m gefen_compile``; gefen-run's own
    directory), as plain ``python script.py`` (``python -m module``) has only its own: a
    module in the working directory must not become importable by a script elsewhere."""
    if not getattr(sys.flags, "safe_path", False):  # `python -P` (3.11+) puts none there
        sys.path[:1] = [entry]


def _run_source(script: str) -> None:
    """Run the source file ``script`` in a new ``__main__`` module, as ``python script.py``
    does: ``__file__`` (and the name in tracebacks) is the working directory joined to the
    path as typed, not normalised, so the script finds its files after an ``os.chdir``; and
    ``__loader__``, ``__package__``, ``__spec__`` and ``__cached__`` are plain python's too."""
    filename = script if os.path.isabs(script) else os.path.join(os.getcwd(), script)
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=filename, __cached__=None, __builtins__=builtins,
                         __loader__=SourceFileLoader("__main__", filename), __annotations__={})
    with io.open_code(filename) as file:
        # dont_inherit: this module's `from __future__ import annotations` is not the script's.
        code = compile(file.read(), filename, "exec", dont_inherit=True)
    sys.modules["__main__"] = main  # kept after the script, as plain python keeps its own
    exec(code, main.__dict__)


def _runner_options(argv: list[str]) -> int:
    """How many leading items of ``argv`` are the runner's own options."""
    i = 0
    while i < len(argv) and (argv[i] in ("--quiet", "-h", "--help", "-m", "--variant", "--")
                             or argv[i].startswith("--variant=")):
        if argv[i] == "-m":
            return min(i + 2, len(argv))
        if argv[i] == "--":  # the end of the runner's options, as for argparse
            return i + 1
        i += 2 if argv[i] == "--variant" else 1
    return min(i, len(argv))


if __name__ == "__main__":
    main()
