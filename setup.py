"""Builds the CPU kernels (plain C, OpenMP; no torch headers needed). Metadata: pyproject.toml."""

import sys

from setuptools import Extension, setup

openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple's clang has no OpenMP flag
setup(
    ext_modules=[
        Extension(
            "gefen_compile.kernels._cpu",
            sources=["gefen_compile/kernels/cpu_step.c"],
            # No contraction into fused multiply-adds: the codes must follow fp32 arithmetic;
            # no errno from sqrt, so that it vectorises (the results are the same).
            extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-fsimd-cost-model=unlimited", "-mtune-ctrl=use_gather", *openmp],
            extra_link_args=openmp,
        )
    ]
)
