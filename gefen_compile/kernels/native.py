"""ctypes bindings of the compiled library (``cpu_step.c``, ``codebook_dp.c``), when there is one.

The library is optional (setup.py builds it only where a C compiler works). Without it
``library`` is None: CPU steps take the plain-torch path and the codebook's dynamic program runs
in numpy. Importing stays silent, since CUDA steps do not need the library (they use its one C call
for their host work where it is built, kernels/prepared.py); the first CPU step warns once
(:func:`warn_missing`). A library built from other sources than those beside it (a checkout
pulled without a rebuild) is not loaded, and the import says so (:func:`stale_reason`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import warnings
from pathlib import Path

import torch

from . import source_digest


class MissingCompilerWarning(RuntimeWarning):
    """The C kernels are not built: CPU steps run the slower plain-torch path."""


class StaleLibraryWarning(RuntimeWarning):
    """The C library was built from other sources than those beside it, and is not used."""


def stale_reason(library_file: str, built: str) -> str | None:
    """Why the library at ``library_file``, built from sources of digest ``built``, must not
    be loaded: the sources beside it have another digest (None where they match, or where the
    sources are not there)."""
    sources = source_digest.digest(Path(library_file).parent)
    if sources is None or sources == built:
        return None
    return (f"{library_file} was built from other sources (digest {built}) than those beside "
            f"it ({sources}), and reads another version's arguments; rebuild it in the "
            "checkout: python setup.py build_ext --inplace --force (or pip install -e .)")


_warned = False  # warn_missing's, or the stale library's at import
_stale = None  # stale_reason's, where the library is refused
try:
    from . import _cpu

    _load_error = None
except ImportError as error:  # not built, or built for another Python
    _cpu, _load_error = None, error
if _cpu is not None and (_stale := stale_reason(
        _cpu.__file__, getattr(_cpu, "source_digest", "none: built before digests were kept"))):
    _cpu, _load_error, _warned = None, ImportError(_stale), True
    warnings.warn(f"gefen_compile: its C library is not used: {_stale}. Until then CPU steps "
                  "run the plain-torch path, tens of times slower, and CUDA steps do their "
                  "per-tensor host work in Python.", StaleLibraryWarning)

_I64 = ctypes.c_int64
_P = ctypes.c_void_p


# The nearest-code tables (codebook.LookupTables) and the thread count, last in both structures.
_TABLE_FIELDS = [("codebook", _P), ("lut", _P), ("bounds", _P), ("first_index", _P),
                 ("num_distinct", _I64), ("lut_half", _I64), ("num_threads", _I64)]


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
        *_TABLE_FIELDS,
        ("short_row", _I64),
        ("layout", _P),
    ]


class MomentumArgs(ctypes.Structure):
    """Mirror of ``MomentumArgs`` in cpu_step.c (GefenMuon's momentum step)."""

    _fields_ = [
        ("numel", _I64),
        ("block", _I64),
        ("grad", _P),
        ("codes", _P),
        ("magnitude", _P),
        ("update", _P),
        ("momentum", ctypes.c_double),
        ("nesterov", _I64),
        *_TABLE_FIELDS,
    ]


def _load() -> ctypes.CDLL | None:
    if _cpu is None:
        return None
    library = ctypes.CDLL(_cpu.__file__)
    library.gefen_step.argtypes = [ctypes.POINTER(StepArgs), ctypes.c_int]
    library.gefen_step.restype = ctypes.c_int
    library.gefen_momentum.argtypes = [ctypes.POINTER(MomentumArgs), ctypes.c_int]
    library.gefen_momentum.restype = ctypes.c_int
    library.gefen_cpu_path.argtypes = [ctypes.c_int]
    library.gefen_cpu_path.restype = ctypes.c_int
    library.gefen_cpu_paths.argtypes = []
    library.gefen_cpu_paths.restype = ctypes.c_int
    library.gefen_last_rows.argtypes = []
    library.gefen_last_rows.restype = ctypes.c_int
    library.gefen_histogram.argtypes = [_I64, _P, _P, _P, _P, _P, _P, _I64]
    library.gefen_histogram.restype = None
    library.gefen_first_gradient_facts.argtypes = [_I64, _P, _P, _P, _P, _P, _P, _I64]
    library.gefen_first_gradient_facts.restype = ctypes.c_int
    library.gefen_codebook_layers.argtypes = [_I64, _P, _P, _I64, _I64, _P, _P]
    library.gefen_codebook_layers.restype = ctypes.c_int
    return library


library = _load()
if _cpu is not None:  # the descriptors kernels/cpu_step.c reads tensors through
    from . import tensor_shim

    _cpu.bind(*(torch._C.TensorBase.__dict__[name]
                for name in ("grad", "dtype", "numel", "is_contiguous", "data_ptr", "is_neg",
                             "device")), torch.autograd.graph.increment_version)
    tensor_shim.bind(_cpu.bind_shim)
# The C step's instruction-set paths, in the order of cpu_step.c's PATH_* (each faster than the
# one before where the CPU runs it): plain vectorised C at the x86-64 (or AArch64 NEON)
# baseline; AVX2, with fp32 and bf16 rows written for it; AVX-512, with those rows too (the
# byte-plane rows, table lookups as AVX-512BW permutes, where their cells do not fit the
# codebook), and its vectoriser's rows for the other dtypes; the byte-plane rows with VBMI's
# byte permutes; and those rows with AVX512_BF16's conversions to bf16. All give the same bits.
CPU_PATHS = ("portable", "avx2", "avx512", "vbmi", "vbmi_bf16")
PATH_VARIABLE = "GEFEN_COMPILE_CPU_PATH"
_log = logging.getLogger("gefen_compile")


def cpu_paths() -> tuple[str, ...]:
    """The paths this CPU runs; () without the C kernels."""
    mask = library.gefen_cpu_paths() if library is not None else 0
    return tuple(name for i, name in enumerate(CPU_PATHS) if mask >> i & 1)


def cpu_path() -> str | None:
    """The path CPU steps take (None without the C kernels: they take the torch path)."""
    return None if library is None else CPU_PATHS[library.gefen_cpu_path(-1)]


def use_cpu_path(name: str) -> str:
    """Make CPU steps take path ``name`` (one of :func:`cpu_paths`); returns the one it
    replaces. By default the fastest path the CPU runs is taken; environment variable
    GEFEN_COMPILE_CPU_PATH picks another for a whole process."""
    if library is None:
        fix = "" if _stale else "; install a C compiler and reinstall gefen-compile"
        raise RuntimeError(f"use_cpu_path({name!r}): the C kernels are not loaded "
                           f"({_load_error}){fix}")
    if name not in CPU_PATHS:
        raise ValueError(f"use_cpu_path: {name!r} is no CPU path; the paths are "
                         f"{', '.join(CPU_PATHS)}, and this CPU runs {', '.join(cpu_paths())}")
    if name not in cpu_paths():
        raise ValueError(f"use_cpu_path: {name!r} is not a path this CPU runs; it runs "
                         f"{', '.join(cpu_paths())}")
    previous = cpu_path()
    library.gefen_cpu_path(CPU_PATHS.index(name))
    _log.debug("CPU steps take the %s path (%s)", name, processor_name())
    return previous


def processor_name() -> str:
    """The CPU's model name, for attributing timings."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The rows of cpu_step.c's ROWS_*: a path's own rows, or the vectoriser's rows of its instruction
# set where the path has none (fp16, fp64) or its tables do not fit the codebook.
ROWS = (None, "portable", "avx2 (vectorised)", "avx2", "avx512 (vectorised)", "vbmi", "avx512",
        "vbmi_bf16")
_logged_rows = None


def last_rows() -> str | None:
    """The rows the last CPU step ran (None before any)."""
    return None if library is None else ROWS[library.gefen_last_rows()]


def describe() -> str:
    """Which C step CPU steps take and why, for reports: path, rows last run, CPU."""
    if library is None:
        return f"plain torch (the C kernels are not built: {_load_error})"
    rows = last_rows()
    ran = f"; last step ran the {rows} rows" if rows and rows != cpu_path() else ""
    return (f"C, {cpu_path()} path{ran} (of {', '.join(cpu_paths())} on {processor_name()}; "
            f"{PATH_VARIABLE} picks another)")


def log_rows() -> None:
    """Debug-log the rows CPU steps run, when they change (first step, path or dtype)."""
    global _logged_rows
    rows = last_rows()
    if rows != _logged_rows:
        _logged_rows = rows
        _log.debug("CPU step: %s", describe())


if library is not None and os.environ.get(PATH_VARIABLE):
    try:
        use_cpu_path(os.environ[PATH_VARIABLE])
    except ValueError as error:
        raise ValueError(f"{PATH_VARIABLE}={os.environ[PATH_VARIABLE]}: {error}") from None


# GNU OpenMP (the libgomp torch's CPU builds load) hangs a child forked after its parent used
# OpenMP threads, at the child's first parallel region of more than one thread: it waits for
# threads the fork did not copy. Kernels in a forked child (hogwild workers, say) use one.
_forked = False


def _mark_forked() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_mark_forked)


def threads() -> int:
    """Threads for a kernel call: torch's number, or 1 in a forked child."""
    return 1 if _forked else torch.get_num_threads()


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
        "steps do not need them.",
        MissingCompilerWarning,
    )
