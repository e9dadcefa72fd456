#!/usr/bin/env bash
# The C kernels under AddressSanitizer and UndefinedBehaviorSanitizer: builds them with
# GEFEN_SANITIZE=1 (setup.py) into a temporary copy of the working tree (the tree's own build is
# never touched), then runs pytest there against that build. Fails on any test failure and on
# any sanitizer report, from pytest or from a process it starts.
#
#   scripts/sanitize.sh                  the kernel and optimizer tests
#   scripts/sanitize.sh --ci             the subset CI runs (about a minute on 2 cores)
#   scripts/sanitize.sh tests/x.py -k y  any pytest arguments
#
# How ASan runs inside python (found with gcc 12 on Debian 12): the library is dlopen'ed by
# ctypes, after the process started, so the ASan runtime must be preloaded (LD_PRELOAD of the
# compiler's libasan.so; without it the import fails with "ASan runtime does not come first in
# initial library list"); UBSan's runtime loads as the library's dependency. detect_leaks=0:
# python and torch keep allocations until exit by design, which LeakSanitizer would report.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}

kernel_tests=(tests/test_sanitizer.py tests/test_kernels.py tests/test_step_reference.py
              tests/test_step_checks.py tests/test_codebook.py tests/test_partition.py
              tests/test_checkpoint.py tests/test_optimizer_contract.py tests/test_properties.py)
# CI: the canaries, every C path of the step (each dtype, VBMI and portable rows, strided and
# late parameters) and the first-step kernels, without the Triton interpreter's cases.
ci_tests=(tests/test_sanitizer.py tests/test_kernels.py tests/test_step_reference.py
          tests/test_step_checks.py tests/test_partition.py -k "not triton")
if [ $# -eq 0 ]; then
  set -- "${kernel_tests[@]}"
elif [ "$1" = "--ci" ]; then
  shift
  set -- "${ci_tests[@]}" "$@"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/gefen-sanitize.XXXXXX")
trap 'rm -rf "$work"' EXIT
# The files git knows of (tracked, or untracked and not ignored): no build outputs.
git -C "$root" ls-files -z --cached --others --exclude-standard \
  | (cd "$root" && tar --null --ignore-failed-read -T - -cf -) | tar -xf - -C "$work"

cd "$work"
echo "sanitize: building the kernels with ASan and UBSan in $work"
if ! GEFEN_SANITIZE=1 "$python" setup.py build_ext --inplace >build.log 2>&1; then
  cat build.log >&2
  exit 1
fi
if ! ls gefen_compile/kernels/_cpu*.so >/dev/null 2>&1; then  # the extension is optional
  cat build.log >&2
  echo "sanitize: the sanitized build produced no library (see the log above)" >&2
  exit 1
fi
cc=$("$python" -c 'import sysconfig; print((sysconfig.get_config_var("CC") or "gcc").split()[0])')
libasan=$("$cc" -print-file-name=libasan.so)
if [ ! -e "$libasan" ]; then
  echo "sanitize: $cc has no libasan.so (Debian: apt-get install libasan8)" >&2
  exit 1
fi

mkdir reports
export LD_PRELOAD="$libasan${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$work/reports/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$work/reports/ubsan"
export PYTHONPATH="$work" GEFEN_SANITIZED=1  # the tests import this copy; the canaries run
status=0
"$python" -m pytest -q -p no:cacheprovider "$@" || status=$?
if compgen -G "reports/*" >/dev/null; then
  for report in reports/*; do
    echo "=== sanitizer report $report" >&2
    cat "$report" >&2
  done
  echo "sanitize: FAILED, sanitizer reports above" >&2
  exit 1
fi
[ "$status" -eq 0 ] && echo "sanitize: clean (no sanitizer report)"
exit "$status"
