"""Run first by every Python process started under the runner: ``runner.py`` puts this
directory at the front of ``PYTHONPATH``, where Python's ``site`` finds this module at startup,
whatever started the process (``subprocess`` with ``sys.executable`` as accelerate and
Lightning's DDP launcher do, torchrun, ``multiprocessing``'s spawn and forkserver).

Where the runner's environment variable is set, the process is set up as the runner's own
(``runner.enter_child``) as soon as ``torch`` has been imported, so a process that never imports
torch pays nothing. Then the ``sitecustomize`` this one shadows, if any, runs as it would have.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ENV = "GEFEN_COMPILE_RUNNER"  # runner.ENV (this module runs before gefen_compile is importable)


def _enter() -> None:
    try:
        from gefen_compile.runner import enter_child
    except ImportError as error:
        sys.stderr.write(
            f"gefen_compile: this process ({sys.executable}) was started under python -m "
            f"gefen_compile but cannot import gefen_compile ({error}), so its AdamW is not "
            "converted: install gefen-compile into this interpreter's environment\n")
        return
    enter_child()


class _AfterTorch(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loading of ``torch`` to call :func:`_enter` once
    torch is whole (importing gefen_compile halfway through torch's own import would fail)."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                _enter()

            spec.loader.exec_module = exec_module
        return spec


def _run_shadowed() -> None:
    """Run the ``sitecustomize`` module that this one hides on ``sys.path``, if there is one."""
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["sitecustomize"] = module
        spec.loader.exec_module(module)


if os.environ.get(_ENV):
    if "torch" in sys.modules:
        _enter()
    else:
        sys.meta_path.insert(0, _AfterTorch())
_run_shadowed()
