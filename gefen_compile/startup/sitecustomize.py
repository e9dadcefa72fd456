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

_ENV = "GEFEN_COMPILE_RUNNER"  # runner.ENV (this module runs before gefen_compile is importable)
# The directories of every copy of this module run in this process (a second install, a
# symlinked spelling): none of them is run again as the module a copy shadows.
_RAN = sys.__dict__.setdefault("_gefen_compile_startup_dirs", [])


def _enter() -> None:
    """Set the process up; never break the import of torch that triggered it."""
    try:
        from gefen_compile.runner import enter_child

        enter_child()
    except Exception as error:  # noqa: BLE001 (the user's import of torch must go on)
        sys.stderr.write(
            f"gefen_compile: this process ({sys.executable}) was started under python -m "
            f"gefen_compile but could not be set up as the runner's ({type(error).__name__}: "
            f"{error}), so its AdamW is not converted; is gefen-compile installed in this "
            "interpreter's environment?\n")


class _AfterTorch(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it hands out torch's spec from the finders after it, with a
    loader that calls :func:`_enter` once torch is whole (importing gefen_compile halfway
    through torch's own import would fail). A spec only looked up
    (``importlib.util.find_spec("torch")``, as transformers checks for torch) is never
    executed, so the finder stays until torch is really imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch" or self not in sys.meta_path:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1:]:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                    _enter()

            spec.loader.exec_module = exec_module
        return spec


def _run_shadowed() -> None:
    """Run the ``sitecustomize`` module that this one hides on ``sys.path``, if there is one."""
    rest = [p for p in sys.path if os.path.realpath(p or os.curdir) not in _RAN]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["sitecustomize"] = module
        spec.loader.exec_module(module)


if os.environ.get(_ENV) and not _RAN:
    if "torch" in sys.modules:
        _enter()
    else:
        sys.meta_path.insert(0, _AfterTorch())
_RAN.append(os.path.dirname(os.path.realpath(__file__)))
_run_shadowed()
