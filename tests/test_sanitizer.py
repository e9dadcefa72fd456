"""Canaries for scripts/sanitize.sh: with the kernels built under AddressSanitizer and
UndefinedBehaviorSanitizer, a deliberately wrong call into the C step is reported. A clean
sanitized run of the other tests means something only if these reports appear.

Skipped outside that script (it sets GEFEN_SANITIZED=1): an unsanitized library would read and
write out of bounds for real. Each bad call runs in a child process, since a report aborts it;
the child logs to stderr instead of the script's report files, which fail the run."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("GEFEN_SANITIZED") != "1", reason="runs under scripts/sanitize.sh only"
)

# One fp32 or bf16 parameter of 8192 elements after its first step; the child then calls the C
# step with the bucket's arguments, one of them replaced by the `bad` line.
CHILD = """
import torch
from gefen_compile import Gefen
from gefen_compile.kernels import cpu_step, native

native.use_cpu_path({path!r})
p = torch.nn.Parameter(torch.randn(64, 128, dtype=torch.{dtype}))
opt = Gefen([p])
p.grad = torch.randn_like(p)
opt.step()
{setup}
args = opt._kernel_args(opt._buckets[0], [p.grad])
{bad}
cpu_step.step(*args)
print("no report")
"""
SHORT_CODES = "args = args._replace(codes=args.codes[:-1].clone())  # one byte short"
# A codebook too fine for the AVX2 rows' cells, not for the byte planes' (see
# test_a_codebook_too_fine_for_the_cell_table_takes_other_rows): the avx512 path's plane rows
PLANES_ONLY = textwrap.dedent("""
    saved = opt.state_dict()
    codebook = saved["codebook"].clone()
    codebook[100:110] = 0.3 + 1e-4 * torch.arange(10)
    saved["codebook"] = codebook.sort().values
    opt.load_state_dict(saved)
    opt.step()  # builds the buckets again
""")

MISALIGNED_PARAM = textwrap.dedent("""
    class Misaligned:  # stands in for the parameter: its data pointer is one byte off
        def __init__(self, t):
            self.t = t
        def data_ptr(self):
            return self.t.data_ptr() + 1
    buffer = torch.zeros(p.numel() + 1, dtype=p.dtype)
    args = args._replace(params=[Misaligned(buffer)])
""")


def run_child(dtype: str, path: str, bad: str, setup: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1"  # reports to stderr
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    code = CHILD.format(dtype=dtype, path=path, bad=bad, setup=setup)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def paths() -> tuple[str, ...]:
    from gefen_compile.kernels import native

    return native.cpu_paths()


def best_path() -> str:
    return paths()[-1]


@pytest.mark.parametrize(
    "dtype, path, row, setup",
    [("float32", "portable", "row_f32_portable", ""),
     ("bfloat16", "portable", "row_bf16_portable", ""),
     ("float32", "avx2", "row_f32_avx2", ""), ("bfloat16", "avx2", "row_bf16_avx2", ""),
     ("float32", "avx512", "row_f32_avx512", PLANES_ONLY),
     ("bfloat16", "avx512", "row_bf16_avx512", PLANES_ONLY),
     ("float16", "avx512", "row_f16_vec_avx512", ""), ("float32", "vbmi", "row_f32_vbmi", ""),
     ("bfloat16", "vbmi", "row_bf16_vbmi", ""),
     ("bfloat16", "vbmi_bf16", "row_bf16_vbmi_bf16", "")],
)
def test_a_short_codes_buffer_is_reported_by_asan(dtype, path, row, setup):
    if path not in paths():
        pytest.skip(f"this CPU does not run the {path} path")
    child = run_child(dtype, path, SHORT_CODES, setup)
    assert child.returncode != 0 and "no report" not in child.stdout
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in child.stderr, child.stderr[-3000:]
    # The report points into the row that overran, one byte past an 8191-byte buffer.
    assert re.search(rf"in {row}\b", child.stderr), child.stderr[-3000:]
    assert "0 bytes to the right of 8191-byte region" in child.stderr


def test_a_misaligned_parameter_is_reported_by_ubsan():
    child = run_child("float32", "portable", MISALIGNED_PARAM)
    assert child.returncode != 0 and "no report" not in child.stdout
    assert "runtime error: load of misaligned address" in child.stderr, child.stderr[-3000:]
    assert "cpu_step.c" in child.stderr


def test_the_correct_call_is_clean():
    """The canaries' setup itself reports nothing: the reports above come from the bad input."""
    child = run_child("float32", best_path(), "")
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.strip() == "no report" and "Sanitizer" not in child.stderr
