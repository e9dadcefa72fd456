"""Builds the CPU kernels (plain C and OpenMP; no torch headers needed). Metadata: pyproject.toml.

The extension is optional: without a working C compiler the build warns and the install goes on
without it; CPU steps then run the plain-torch path (kernels/native.py says so at run time), and
CUDA steps never need it.

GEFEN_SANITIZE=1 builds them with AddressSanitizer and UndefinedBehaviorSanitizer, for
scripts/sanitize.sh (which builds into a temporary copy and says how to load the result)."""

import importlib.util
import os
import platform
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup

# No contraction into fused multiply-adds: the codes must follow fp32 arithmetic exactly. No
# errno from sqrt, and no cost model overriding `omp simd`, so that the row loops vectorise
# (the results are the same).
flags = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno"]
gcc = "gcc" in (sysconfig.get_config_var("CC") or "gcc") and sys.platform.startswith("linux")
if gcc:
    flags += ["-fopenmp", "-fsimd-cost-model=unlimited"]
if gcc and platform.machine() in ("x86_64", "AMD64"):
    # GCC's generic tuning makes the vectorised table lookups scalar loads, not gathers; the
    # tuning of a CPU model, from CFLAGS (-march=native, conda's -mtune=haswell), makes
    # thousands of gathers. Under the microcode against Downfall (GDS) that Intel's Skylake to
    # Ice Lake hosts carry, gathers made GefenMuon's momentum rows take 2.1x the time (AVX2, an
    # Ice Lake server, 2026-12-07). These flags come after CFLAGS, so they win.
    flags.append("-mtune=generic")
link_flags = ["-fopenmp"] if gcc else []

# The sources' digest, built into the library: kernels/native.py refuses a stale one.
kernels = Path("gefen_compile/kernels")  # relative, as setuptools wants sources
here = Path(__file__).resolve().parent / kernels
spec = importlib.util.spec_from_file_location("source_digest", here / "source_digest.py")
sources = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sources)
if os.environ.get("GEFEN_SANITIZE") == "1":
    # Same optimisation (the vector paths are the ones under test), plus debug lines for the
    # reports; any undefined behaviour aborts, as an ASan report does.
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    flags += [*sanitize, "-g", "-fno-omit-frame-pointer"]
    link_flags += sanitize
setup(
    ext_modules=[
        Extension(
            "gefen_compile.kernels._cpu",
            sources=[str(kernels / name) for name in sources.SOURCES],
            define_macros=[("GEFEN_SOURCE_DIGEST", f'"{sources.digest(here)}"')],
            extra_compile_args=flags,
            extra_link_args=link_flags,
            optional=True,
        )
    ]
)
