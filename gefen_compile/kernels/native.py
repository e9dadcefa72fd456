"""ctypes bindings of the compiled library (``cpu_step.c``, ``codebook_dp.c``)."""

from __future__ import annotations

import ctypes

from . import _cpu

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


library = ctypes.CDLL(_cpu.__file__)
library.gefen_step.argtypes = [ctypes.POINTER(StepArgs), ctypes.c_int]
library.gefen_step.restype = ctypes.c_int
library.gefen_vbmi_rows.argtypes = [ctypes.c_int]
library.gefen_vbmi_rows.restype = ctypes.c_int
library.gefen_histogram.argtypes = [_I64, _P, _P, _P, _P, _P, _P, _I64]
library.gefen_histogram.restype = None
library.gefen_period_scores.argtypes = [_I64, _P, _P, _P, _P, _P, _P, _I64]
library.gefen_period_scores.restype = ctypes.c_int
library.gefen_codebook_dp.argtypes = [_I64, _P, _P, _I64, _I64, _P]
library.gefen_codebook_dp.restype = ctypes.c_double
