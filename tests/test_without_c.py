"""The package without its C extension: it builds without a C compiler, imports silently, learns
the same codebook, and its CPU steps take the torch path after one warning.

Each run is a fresh interpreter, since the library is looked for once, at import; an import
hook stands in for the missing ``_cpu`` module."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gefen_compile.kernels import native

ROOT = Path(__file__).resolve().parents[1]

RUN = textwrap.dedent(
    """
    import sys, warnings

    class NoCompiledExtension:
        def find_spec(self, name, path=None, target=None):
            if name == "gefen_compile.kernels._cpu":
                raise ModuleNotFoundError("No module named 'gefen_compile.kernels._cpu'")

    if sys.argv[1] == "without":
        sys.meta_path.insert(0, NoCompiledExtension())
    warnings.simplefilter("always")  # every warning is recorded, not only the first per place

    import json
    import numpy as np
    import torch

    with warnings.catch_warnings(record=True) as at_import:
        warnings.simplefilter("always")
        import gefen_compile
        from gefen_compile.codebook import learn_codebook
        from gefen_compile.first_step import first_histogram
        from gefen_compile.kernels import native
        # The host part of a CUDA run's first step: the codebook's dynamic program.
        learn_codebook(torch.from_numpy(np.random.default_rng(0).integers(0, 50, 4096)))

    # Both runs step on the same stored gradients, so that only the optimizer's two paths are
    # compared, not two backward passes (CI's machine once learned two codebooks from two runs
    # of one script, where every run here agreed).
    saved = torch.load(sys.argv[3])
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48), torch.nn.Tanh(),
        torch.nn.Linear(48, 3),
    )
    model.load_state_dict(saved["model"])
    optimizer = gefen_compile.Gefen(model.parameters(), lr=1e-2, weight_decay=0.1)
    with warnings.catch_warnings(record=True) as at_steps:
        warnings.simplefilter("always")
        for grads in saved["grads"]:
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()

    states = [optimizer.state[p] for p in model.parameters()]
    periods = [s["period"] for s in states]
    first = saved["grads"][0]
    torch.save(
        {
            # What the first step learned the codebook from, to tell a failure's stage.
            "histogram": first_histogram(first, first, periods, [False] * len(first),
                                         optimizer.variant),
            "params": [p.detach().clone() for p in model.parameters()],
            "codebook": optimizer.codebook,
            "codes": [s["codes"].clone() for s in states],
            "periods": periods,
        },
        sys.argv[2],
    )
    print(json.dumps({
        "library": native.library is not None,
        "at_import": [str(w.message) for w in at_import],
        "at_steps": [(w.category.__name__, str(w.message)) for w in at_steps],
    }))
    """
)


def model_and_gradients(path: Path) -> Path:
    """A small MLP's weights and the gradients of six batches (with rows for periods > 1)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48), torch.nn.Tanh(),
        torch.nn.Linear(48, 3),
    )
    grads = []
    for _ in range(6):
        model.zero_grad()
        x, y = torch.randn(64, 12), torch.randn(64, 3)
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.save({"model": model.state_dict(), "grads": grads}, path)
    return path


def run(variant: str, out: Path, gradients: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", RUN, variant, str(out), str(gradients)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(native.library is None, reason="compares against the C extension")
def test_without_the_c_extension_import_is_silent_and_steps_match(tmp_path):
    gradients = model_and_gradients(tmp_path / "gradients.pt")
    with_c = run("with", tmp_path / "with.pt", gradients)
    without_c = run("without", tmp_path / "without.pt", gradients)
    assert with_c["library"] and not without_c["library"]
    # Importing, and the codebook a CUDA run learns on the host, need no warning.
    assert with_c["at_import"] == [] and without_c["at_import"] == []
    assert with_c["at_steps"] == []
    # One warning in six steps: it names the compiler, the fix and the cost.
    [(category, message)] = without_c["at_steps"]
    assert category == "MissingCompilerWarning"
    for words in ("C compiler", "gcc", "reinstall", "slower", "plain-torch path"):
        assert words in message

    a, b = (torch.load(tmp_path / f"{v}.pt") for v in ("with", "without"))
    # The period scores choose the same periods; the histogram (integers) and the dynamic
    # program (the same float64 operations) give the same codebook, bit for bit.
    assert a["periods"] == b["periods"] and max(a["periods"]) > 1 and min(a["periods"]) == 1
    assert torch.equal(a["histogram"], b["histogram"])
    assert torch.equal(a["codebook"], b["codebook"])
    # Every quantisation decision is exact on both paths: the same codes. The C kernel sums a
    # row's squared gradients in its own order, so parameters agree to fp32 rounding.
    for codes_a, codes_b in zip(a["codes"], b["codes"]):
        assert torch.equal(codes_a, codes_b)
    for pa, pb in zip(a["params"], b["params"]):
        torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("compiler", ["/bin/false", "no-such-compiler"])
def test_the_build_goes_on_without_a_c_compiler(tmp_path, compiler):
    """setup.py's extension is optional: a compiler that fails, or none at all, gives a warning
    and a build without the library (pip installs it as it is)."""
    if compiler != "/bin/false":
        compiler = str(tmp_path / compiler)
    build = tmp_path / "build"
    result = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(build / "lib"),
         "--build-temp", str(build / "temp")],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "CC": compiler},
    )
    assert result.returncode == 0, result.stderr
    assert 'building extension "gefen_compile.kernels._cpu" failed' in result.stdout + result.stderr
    assert not list(build.rglob("_cpu*"))


STALE = textwrap.dedent(
    """
    import json, warnings
    import torch

    with warnings.catch_warnings(record=True) as at_import:
        warnings.simplefilter("always")
        import gefen_compile
        from gefen_compile.kernels import native
    p = torch.nn.Parameter(torch.randn(64, 16))
    optimizer = gefen_compile.Gefen([p])
    with warnings.catch_warnings(record=True) as at_steps:
        warnings.simplefilter("always")
        for _ in range(2):
            p.grad = torch.randn(64, 16)
            optimizer.step()
    print(json.dumps({
        "package": gefen_compile.__file__,
        "library": native.library is not None,
        "at_import": [(w.category.__name__, str(w.message)) for w in at_import],
        "at_steps": [w.category.__name__ for w in at_steps],
        "finite": bool(p.isfinite().all()),
    }))
    """
)


@pytest.mark.skipif(native.library is None, reason="needs the built C library")
def test_the_library_carries_the_digest_of_the_sources_it_was_built_from():
    from gefen_compile.kernels import _cpu, source_digest

    folder = Path(_cpu.__file__).parent
    assert _cpu.source_digest == source_digest.digest(folder)
    assert native.stale_reason(_cpu.__file__, _cpu.source_digest) is None


@pytest.mark.skipif(native.library is None, reason="needs the built C library")
@pytest.mark.parametrize("edit", [False, True])
def test_a_library_built_from_other_sources_is_refused_with_one_warning(tmp_path, edit):
    """A checkout whose C sources changed after its library was built (a pull without a
    rebuild) must not run that library: it would read another version's argument structures.
    The package copied with its library loads it; with a source edited, the import warns once,
    naming the rebuild, and steps take the torch path without a second warning."""
    import shutil

    copy = tmp_path / "gefen_compile"
    shutil.copytree(ROOT / "gefen_compile", copy,
                    ignore=shutil.ignore_patterns("__pycache__"))
    if edit:
        with open(copy / "kernels" / "cpu_step.c", "a") as source:
            source.write("/* an edit after the build */\n")
    result = subprocess.run([sys.executable, "-c", STALE], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert Path(out["package"]).is_relative_to(copy)
    assert out["finite"]
    if not edit:
        assert out["library"] and out["at_import"] == [] and out["at_steps"] == []
        return
    assert not out["library"]
    [(category, message)] = out["at_import"]
    assert category == "StaleLibraryWarning"
    for words in ("other sources", "build_ext --inplace --force", "pip install -e .",
                  "plain-torch path"):
        assert words in message
    assert out["at_steps"] == []
