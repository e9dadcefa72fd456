"""What the CUDA kernels compile to, for real targets, read from their SASS (no GPU needed).

    python benchmarks/bench_gpu_static.py [--arch 80 90] [--dtype fp32 bf16 fp16]
                                          [--kernel step momentum]

For every specialisation the launchers produce for a realistic mixed bucket (Gefen's step) and
a set of GefenMuon matrices (its momentum step; gefen_compile/kernels/aot.py), one table per
kernel: registers per thread, spill instructions, SASS instructions per element of a tile (a
static count: the kernel body once, over the elements one tile covers; the momentum kernel's
body holds its tile loop twice, the second for a short last row), the widths of its global
loads and stores, and the occupancy its registers allow on an H100-class SM (65536 registers,
at most 64 warps). Run with TRITON_INTERPRET unset; put another Triton first on PYTHONPATH to
compare versions.
"""

from __future__ import annotations

import argparse

from gefen_compile.kernels.aot import parsed_specialisations

REGISTERS_PER_SM, MAX_WARPS_PER_SM = 65536, 64


def occupancy(registers: int, warps: int) -> float:
    """Fraction of an SM's warp slots that programs of this size can fill."""
    per_program = max(registers, 1) * 32 * warps
    programs = min(REGISTERS_PER_SM // per_program, MAX_WARPS_PER_SM // warps)
    return programs * warps / MAX_WARPS_PER_SM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args, results = parsed_specialisations(parser)
    # The column that tells a kernel's specialisations apart beside the tile and alignment.
    own = {"step": ("per element v", "PER_ELEMENT"), "momentum": ("nesterov", "NESTEROV")}
    for kernel in args.kernel:
        title, key = own[kernel]
        print(f"\n{kernel}\n")
        print(f"| target | dtype | cols x rows | {title} | column chunks | aligned | warps "
              "| registers | spills | SASS instr / element | global loads (bits: n) "
              "| global stores | occupancy |")
        print("|" + "---|" * 13)
        for k in (r for r in results if r.kernel == kernel):
            c = k.constexprs
            warps = c.get("num_warps", 4)
            print(f"| sm_{k.arch} | {k.dtype} | {c['COLS']} x {c['ROWS']} | {c[key]} "
                  f"| {c['MULTI']} | {c['ALIGNED']} | {warps} | {k.registers} | {k.spills} "
                  f"| {k.sass_instructions * 32 * warps / (c['ROWS'] * c['COLS']):.1f} "
                  f"| {k.global_loads} "
                  f"| {k.global_stores} | {occupancy(k.registers, warps):.0%} |")


if __name__ == "__main__":
    main()
