"""The runner (``python -m gefen_compile``): what it prints, and the processes a script starts
(torch.multiprocessing's spawn and forkserver workers, torchrun's, workers started through
subprocess as Lightning and accelerate start them) running patched too."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONVERSION = re.compile(r"^gefen_compile: converted torch\.optim\.adamw\.AdamW to Gefen "
                        r"\((\d+) tensors, (\d+) parameters\): optimizer state \S+ \S+ -> ")


def run(args, tmp_path, timeout=120):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    env.pop("GEFEN_COMPILE_RUNNER", None)
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def conversions(stderr: str) -> list[tuple[int, int]]:
    return [tuple(map(int, m.groups())) for m in map(CONVERSION.match, stderr.splitlines()) if m]


TRAIN = """
import logging, sys, torch
from torch.optim import AdamW  # taken before anything else: converted at its first step
{configure}
model = torch.nn.Linear(32, 16)
opt = AdamW(model.parameters(), lr=1e-2)
model(torch.randn(4, 32)).sum().backward()
opt.step()
print(type(opt).__name__, opt.variant.name)
"""


@pytest.mark.parametrize("quiet", [False, True])
def test_runner_prints_one_line_per_conversion_unless_quiet(tmp_path, quiet):
    (tmp_path / "train.py").write_text(TRAIN.format(configure=""))
    result = run(["-m", "gefen_compile", *(["--quiet"] if quiet else []), "train.py"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "GefenAdamW robust"
    assert conversions(result.stderr) == ([] if quiet else [(2, 32 * 16 + 16)])
    assert ("gefen_compile" in result.stderr) == (not quiet)


@pytest.mark.parametrize("option", [["--variant", "published"], ["--variant=published"]])
def test_runner_converts_to_the_variant_asked_for(tmp_path, option):
    (tmp_path / "train.py").write_text(TRAIN.format(configure=""))
    result = run(["-m", "gefen_compile", *option, "--quiet", "train.py"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "GefenAdamW published"


def test_runner_leaves_the_report_to_the_users_logging(tmp_path):
    configure = "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s %(message)s')"
    (tmp_path / "train.py").write_text(TRAIN.format(configure=configure))
    result = run(["-m", "gefen_compile", "train.py"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert conversions(result.stderr) == []
    (line,) = [x for x in result.stderr.splitlines() if "converted" in x]
    assert line.startswith("INFO gefen_compile converted torch.optim.adamw.AdamW to Gefen (2 tensors")


def test_runner_passes_options_after_a_module_to_the_module(tmp_path):
    (tmp_path / "echo_args.py").write_text("import sys\nprint(sys.argv[1:])\n")
    result = run(["-m", "gefen_compile", "--quiet", "-m", "echo_args", "--nproc", "2", "-m", "x"],
                 tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['--nproc', '2', '-m', 'x']"


# What a script sees of how it was started; it changes directory first, as some do.
SEES = """
import os, sys
os.chdir(os.path.dirname(os.getcwd()))
print("__file__", __file__)
print("data next to it", open(os.path.join(os.path.dirname(__file__), "data.txt")).read())
print("argv", sys.argv)
print("path", sys.path)
print("code", sys._getframe().f_code.co_filename)
print("globals", sorted((k, type(v).__name__) for k, v in globals().items() if k.startswith("__")))
print("package, spec, cached", __package__, __spec__, __cached__)
print("is __main__", sys.modules["__main__"].__dict__ is globals())
try:
    import localmod  # in the working directory the script was started from, not beside it
    print("imported localmod")
except ImportError as error:
    print(error)
"""


@pytest.mark.parametrize("typed", ["scripts/sees.py", "./scripts//../scripts/sees.py", "abs"])
def test_a_script_sees_what_plain_python_gives_it(tmp_path, typed):
    """__file__ is absolute (the working directory joined to the path as typed, so it still
    works after os.chdir), sys.argv[0] is as typed, and sys.path starts with the script's own
    directory alone: a module in the working directory is not importable, as under plain
    python (the runner's `python -m` had put the working directory there)."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "sees.py").write_text(SEES)
    (tmp_path / "scripts" / "data.txt").write_text("found")
    (tmp_path / "localmod.py").write_text("")
    script = str(tmp_path / "scripts" / "sees.py") if typed == "abs" else typed
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GEFEN_COMPILE_RUNNER", None)
    outputs = [subprocess.run([sys.executable, *runner, script, "an-arg"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
               for runner in ([], ["-m", "gefen_compile", "--quiet"])]
    plain, patched = outputs
    assert plain.returncode == 0 and "No module named 'localmod'" in plain.stdout, plain.stderr
    assert patched.returncode == 0, patched.stderr
    assert patched.stdout.splitlines() == plain.stdout.splitlines()


# Two gloo ranks, a DDP model, a few steps; each rank writes the class of its optimizer.
DDP_STEPS = """
import gc

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.optim import AdamW


def train(out):
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(32, 16))
    opt = AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(8, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    with open(f"{out}/rank{rank}", "w") as f:
        f.write(f"{type(opt).__name__} {opt.variant.name}")


def run(out):
    train(out)
    # DDP's model is freed (its hooks form a cycle: collected here) on every rank before any
    # closes its gloo connections: a peer closing early aborts the other rank at exit.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
"""

SPAWN = DDP_STEPS + """
import sys
import torch.multiprocessing as mp


def worker(rank, out):
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank,
                            world_size=2)
    run(out)


if __name__ == "__main__":
    mp.start_processes(worker, args=(sys.argv[1],), nprocs=2, start_method=sys.argv[2])
"""

# Workers started as `python train.py` through subprocess, as Lightning's DDP launcher and
# accelerate's launcher start them.
SUBPROCESS = DDP_STEPS + """
import os
import subprocess
import sys

if "RANK" in os.environ:
    dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}/rendezvous",
                            rank=int(os.environ["RANK"]), world_size=2)
    run(sys.argv[1])
else:
    workers = [subprocess.Popen([sys.executable, __file__, sys.argv[1]],
                                env={**os.environ, "RANK": str(rank)}) for rank in range(2)]
    sys.exit(max(worker.wait() for worker in workers))
"""

TORCHRUN = DDP_STEPS + """
import sys

dist.init_process_group("gloo")
run(sys.argv[1])
"""


@pytest.mark.parametrize("launcher", ["spawn", "forkserver", "torchrun", "subprocess"])
def test_processes_the_script_starts_run_patched(tmp_path, launcher):
    out = tmp_path / "out"
    out.mkdir()
    if launcher == "torchrun":
        (tmp_path / "train.py").write_text(TORCHRUN)
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "train.py", str(out)]
    elif launcher == "subprocess":
        (tmp_path / "train.py").write_text(SUBPROCESS)
        args = ["train.py", str(out)]
    else:  # torch.multiprocessing's start methods
        (tmp_path / "train.py").write_text(SPAWN)
        args = ["train.py", str(out), launcher]
    # The variant chosen on the runner's command line reaches the workers too.
    result = run(["-m", "gefen_compile", "--variant", "published", *args], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(out / f"rank{r}").read_text() for r in range(2)] == ["GefenAdamW published"] * 2
    assert conversions(result.stderr) == [(2, 32 * 16 + 16)] * 2, result.stderr[-3000:]


CHILDREN = """
import subprocess, sys
for code in ("import sys, builtins; print(getattr(builtins, 'USER_SITE', False), "
             "'gefen_compile' in sys.modules, 'torch' in sys.modules)",
             "import torch; print(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).variant.name)",
             # transformers looks torch up before importing it
             "import importlib.util; assert importlib.util.find_spec('torch'); import torch; "
             "print(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).variant.name)"):
    print(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip())
"""


def test_a_python_child_runs_the_users_sitecustomize_and_imports_gefen_only_with_torch(tmp_path):
    """The runner's startup module runs the sitecustomize it shadows, and sets a child up only
    once it imports torch: a child that never does pays nothing."""
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.USER_SITE = True\n")
    (tmp_path / "children.py").write_text(CHILDREN)
    result = run(["-m", "gefen_compile", "--variant", "published", "children.py"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "False", "False", "published", "published"]


def test_two_copies_of_the_startup_module_run_once_each_and_the_users_once(tmp_path):
    """A second install (or another spelling of the same directory) on PYTHONPATH: no
    recursion, one setup, and the user's sitecustomize after both."""
    from gefen_compile.runner import ENV, STARTUP

    copy = tmp_path / "copy"
    shutil.copytree(STARTUP, copy)
    user = tmp_path / "user"
    user.mkdir()
    (user / "sitecustomize.py").write_text("import builtins\n"
                                           "builtins.USER_SITE = getattr(builtins, 'USER_SITE', 0) + 1\n")
    code = ("import builtins, sys, torch; print(builtins.USER_SITE, "
            "torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).variant.name)")
    env = {**os.environ, ENV: "quiet", "GEFEN_COMPILE_VARIANT": "published",
           "PYTHONPATH": os.pathsep.join([str(copy), STARTUP, str(ROOT), str(user)])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and not result.stderr, result.stderr[-3000:]
    assert result.stdout.split() == ["1", "published"]


def test_a_child_the_runner_cannot_set_up_still_imports_torch():
    from gefen_compile.runner import ENV, STARTUP

    env = {**os.environ, ENV: "report", "GEFEN_COMPILE_VARIANT": "no-such-variant",
           "PYTHONPATH": os.pathsep.join([STARTUP, str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", "import torch; print(torch.optim.AdamW)"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.optim.adamw.AdamW" in result.stdout
    assert "could not be set up as the runner's (ValueError" in result.stderr


def test_the_runner_keeps_the_empty_pythonpath_entries_that_mean_the_working_directory(
        monkeypatch):
    from gefen_compile import runner

    for before, after in (("/x:", f"{runner.STARTUP}:/x:"), ("", runner.STARTUP),
                          (f"{runner.STARTUP}:/x", f"{runner.STARTUP}:/x")):
        monkeypatch.setenv("PYTHONPATH", before)
        runner._start_python_patched()
        assert os.environ["PYTHONPATH"] == after


def test_quiet_holds_for_a_runner_started_under_a_reporting_one(tmp_path):
    (tmp_path / "train.py").write_text(TRAIN.format(configure=""))
    result = run(["-m", "gefen_compile", "-m", "gefen_compile", "--quiet", "train.py"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert conversions(result.stderr) == [] and result.stdout.split() == ["GefenAdamW", "robust"]


def test_importing_the_package_leaves_dynamo_unimported():
    """Every process set up by the runner imports gefen_compile: dynamo's second of imports is
    paid only where something compiles (eager.py)."""
    code = ("import sys, torch, gefen_compile, gefen_compile.runner; "
            "print('torch._dynamo' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"
