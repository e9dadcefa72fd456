"""ctypes bindings of the compiled library (``cpu_step.c``, ``codebook_dp.c``), when there is one.

The library is optional (setup.py builds it only where a C compiler works). Without it
``library`` is None: CPU steps take the plain-torch path and the codebook's dynamic program runs
in numpy. Importing stays silent, since CUDA steps never need the library; the first CPU step
warns once (:func:`warn_missing`).
"""

from __future__ import annotations

import ctypes
import warnings

try:
    from . import _cpu

    _load_error = None
except ImportError as error:  # not built, or built for another Python
    _cpu, _load_error = None, error

_I64 = ctypes.c_int64
_P = ctypes.c_void_p


class StepArgs(ctypes.Structure):
    """Mirror of ``StepArgs`` in cpu_step.c."""

    _fields_ = [
        ("num_rows", _I64),
        ("segments", _P),
        ("num_params", _I64),
        ("params", _P),
        ("grads", _P),
        ("has_grad", _P),
        ("param_group", _P),
        ("hyper", _P),
        ("codes", _P),
        ("magnitude", _P),
        ("vmean", _P),
        ("steps", _P),
        ("codebook", _P),
        ("lut", _P),
        ("bounds", _P),
        ("first_index", _P),
        ("num_distinct", _I64),
        ("lut_half", _I64),
        ("num_threads", _I64),
    ]


class MissingCompilerWarning(RuntimeWarning):
    """The C kernels are not built: CPU steps run the slower plain-torch path."""


def _load() -> ctypes.CDLL | None:
    if _cpu is None:
        return None
    library = ctypes.CDLL(_cpu.__file__)
    library.gefen_step.argtypes = [ctypes.POINTER(StepArgs), ctypes.c_int]
    library.gefen_step.restype = ctypes.c_int
    library.gefen_vbmi_rows.argtypes = [ctypes.c_int]
    library.gefen_vbmi_rows.restype = ctypes.c_int
    library.gefen_histogram.argtypes = [_I64, _P, _P, _P, _P, _P, _P, _I64]
    library.gefen_histogram.restype = None
    library.gefen_period_scores.argtypes = [_I64, _P, _P, _P, _P, _P, _P, _I64]
    library.gefen_period_scores.restype = ctypes.c_int
    library.gefen_codebook_layers.argtypes = [_I64, _P, _P, _I64, _I64, _P, _P]
    library.gefen_codebook_layers.restype = ctypes.c_int
    return library


library = _load()
_warned = False


def warn_missing() -> None:
    """Warn, once per process, that CPU steps run without the C kernels (call only then)."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"gefen_compile: its C CPU kernels are not built ({_load_error}), most likely because "
        "no C compiler was found when it was installed. CPU steps run the plain-torch path "
        "instead, parameter by parameter: results equal up to rounding, but tens of "
        "times slower per step. To build the kernels, install a C compiler (gcc: "
        "apt-get install gcc, or conda install gcc) and reinstall gefen-compile (pip install "
        "--force-reinstall --no-deps gefen-compile; from a checkout, pip install -e .). CUDA "
        "steps never use them.",
        MissingCompilerWarning,
    )
