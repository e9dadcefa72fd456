"""Train a small GPT on the Python standard library's source, with AdamW and with Gefen.

Every run trains the same byte-level GPT from the same initial weights, on the same batches,
with the same hyperparameters and learning-rate schedule; only the optimizer differs. At the end
a table compares validation loss and optimizer-state bytes per parameter (no speed: the runs are
sequential; ``benchmarks/bench_step.py`` times the step side by side).

    python examples/train_gpt.py                     # AdamW, then Gefen (about 6 min, 2 idle cores)
    python examples/train_gpt.py --optimizer gefen --steps 1000 --seed 1
    python examples/train_gpt.py --size tiny --steps 200 --no-plot
    python examples/train_gpt.py --optimizer adamw gefen backend patch runner

``--optimizer`` takes one or more of:

``adamw``
    ``torch.optim.AdamW(model.parameters(), ...)``, written as any training script writes it.
    Under ``python -m gefen_compile`` the runner's patch turns it into Gefen; the report then
    shows the class actually used and its ~1 byte/param of state.
``gefen``
    ``gefen_compile.Gefen(model.parameters(), ...)``, the same arguments.
``backend``
    ``torch.optim.AdamW``, with the model compiled by ``torch.compile(model, backend="gefen")``,
    which converts the AdamW to Gefen at its first step.
``patch``
    ``gefen_compile.patch_adamw()`` before ``torch.optim.AdamW`` is built,
    ``gefen_compile.unpatch_adamw()`` after the run.
``runner``
    This script, unmodified, with ``--optimizer adamw`` in a child process started as
    ``python -m gefen_compile examples/train_gpt.py --optimizer adamw ...``: the runner turns its
    ``torch.optim.AdamW`` into Gefen. Its report and curve come back into this comparison.

Outputs, under ``--out`` (default ``runs/train_gpt``): ``curves.csv`` (one row per step and
run: train loss, validation loss where evaluated, tokens/s, optimizer-state bytes/param) and
``loss.png`` (needs matplotlib; skip it with ``--no-plot``). ``--report FILE`` writes a JSON
summary of each run.

The corpus is a fixed list of standard-library modules, read from the running Python's own
``Lib`` directory, so nothing is downloaded. The first 90% of each file is for training and the
last 10% is held out for validation.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from stdlib_text import read_stdlib_files

# Plain .py modules present, under these paths, in every CPython 3.10 to 3.13 (none moved into
# a package or was removed in those versions). About 2.2 MB; sorted, so the corpus is fixed.
STDLIB_FILES = (
    "_pydecimal.py",
    "argparse.py",
    "ast.py",
    "asyncio/base_events.py",
    "calendar.py",
    "collections/__init__.py",
    "configparser.py",
    "contextlib.py",
    "dataclasses.py",
    "difflib.py",
    "doctest.py",
    "email/message.py",
    "enum.py",
    "fractions.py",
    "functools.py",
    "http/client.py",
    "inspect.py",
    "ipaddress.py",
    "json/encoder.py",
    "logging/__init__.py",
    "optparse.py",
    "pickle.py",
    "random.py",
    "shutil.py",
    "statistics.py",
    "subprocess.py",
    "tarfile.py",
    "tempfile.py",
    "textwrap.py",
    "threading.py",
    "tokenize.py",
    "traceback.py",
    "typing.py",
    "unittest/case.py",
)
VOCAB = 256  # bytes: any text, in any encoding, is in-vocabulary
VAL_FRACTION = 0.1
# Validation batches come from this seed whatever --seed is, so every run of every seed is
# scored on the same held-out windows.
VAL_SEED = 1234
# Periodic evaluations use the first EVAL_BATCHES of the fixed validation batches (cheap); the
# final one uses all FINAL_EVAL_BATCHES, for a less noisy number to compare optimizers by.
EVAL_BATCHES = 4
FINAL_EVAL_BATCHES = 16
EVALS_PER_RUN = 10
OPTIMIZERS = ("adamw", "gefen", "backend", "patch", "runner")
# AdamW's usual GPT settings, shared by every optimizer.
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
WARMUP_FRACTION = 0.05
MIN_LR_FRACTION = 0.1


@dataclass(frozen=True)
class Preset:
    """A model size and the training settings that suit it (each overridable on the CLI)."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    steps: int
    lr: float


PRESETS = {
    # For tests and smoke runs: seconds on a CPU. Width 192 keeps the weights' periods at 192 or
    # more, so Gefen's per-block state stays a small share of its ~1 byte/param, as at scale;
    # the short context keeps the position embedding, whose period is often 1 at this size
    # (5 bytes/param, as published), a small share of the parameters.
    "tiny": Preset(n_layer=2, n_head=4, n_embd=192, block_size=32, batch_size=32, steps=200,
                   lr=3e-3),
    # The default: 3.26M parameters, about 1.5 minutes per optimizer on 2 CPU cores.
    "small": Preset(n_layer=4, n_head=4, n_embd=256, block_size=128, batch_size=8, steps=800,
                    lr=1e-3),
    # For a GPU: 10.8M parameters, a few minutes there, far too long on a CPU.
    "base": Preset(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, steps=3000,
                   lr=1e-3),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one comparison needs; every run of it uses the same values."""

    size: str = "small"
    steps: int = PRESETS["small"].steps
    seed: int = 0
    batch_size: int = PRESETS["small"].batch_size
    block_size: int = PRESETS["small"].block_size
    lr: float = PRESETS["small"].lr
    device: str = "cpu"
    eval_every: int = 0  # 0: EVALS_PER_RUN evaluations spread over the run

    @property
    def eval_interval(self) -> int:
        """Steps between the periodic validation evaluations."""
        return self.eval_every or max(1, self.steps // EVALS_PER_RUN)


# ---------------------------------------------------------------------------------------------
# Data


def load_corpus() -> tuple[Tensor, Tensor]:
    """The :data:`STDLIB_FILES` as uint8 tensors ``(train, val)``.

    Each file is split, not the concatenation: the first 90% of every file trains and its last
    10% validates, so validation covers the same mix of modules as training rather than
    whichever file happens to come last.
    """
    train_parts, val_parts = [], []
    for data in read_stdlib_files(STDLIB_FILES, "train_gpt"):
        split = int(len(data) * (1 - VAL_FRACTION))
        train_parts.append(data[:split])
        val_parts.append(data[split:])

    def as_tensor(parts: list[bytes]) -> Tensor:
        return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)

    return as_tensor(train_parts), as_tensor(val_parts)


def unigram_entropy(data: Tensor) -> float:
    """Entropy (nats/byte) of the byte frequencies of ``data``: the loss of the best model that
    ignores context, the bar a model must clear to have learned anything beyond byte counts."""
    p = torch.bincount(data.long(), minlength=VOCAB).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def sample_batch(
    data: Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``batch_size`` random windows of ``data``: inputs and next-byte targets, both
    ``(batch_size, block_size)`` int64, on the CPU."""
    starts = torch.randint(0, len(data) - block_size, (batch_size,), generator=generator)
    windows = data[starts.unsqueeze(1) + torch.arange(block_size + 1)].long()
    return windows[:, :-1], windows[:, 1:]


def validation_batches(val: Tensor, config: TrainConfig) -> list[tuple[Tensor, Tensor]]:
    """The fixed held-out batches every run is scored on."""
    generator = torch.Generator().manual_seed(VAL_SEED)
    return [
        sample_batch(val, config.batch_size, config.block_size, generator)
        for _ in range(FINAL_EVAL_BATCHES)
    ]


# ---------------------------------------------------------------------------------------------
# Model


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier ones."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        batch, time_, channels = x.shape
        # (3, batch, head, time, head_dim): one matmul for q, k and v.
        qkv = self.qkv(x).view(batch, time_, 3, self.n_head, channels // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, time_, channels))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention, then a 4x GELU MLP, each residual."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only byte-level transformer, GPT-2 style: token and learned position embeddings,
    pre-LayerNorm blocks, a final LayerNorm, and an output head tied to the token embedding."""

    def __init__(self, preset: Preset, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(VOCAB, preset.n_embd)
        self.pos_emb = nn.Embedding(block_size, preset.n_embd)
        self.blocks = nn.ModuleList(
            Block(preset.n_embd, preset.n_head) for _ in range(preset.n_layer)
        )
        self.ln_f = nn.LayerNorm(preset.n_embd)
        self.head = nn.Linear(preset.n_embd, VOCAB, bias=False)
        self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: shrink the projections that write into the residual stream, so its variance
        # does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * preset.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``(batch, time, VOCAB)`` for byte indices ``idx`` of shape ``(batch, time)``."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build_model(config: TrainConfig) -> GPT:
    """A freshly initialised :class:`GPT`; the same ``config.seed`` gives the same weights."""
    torch.manual_seed(config.seed)
    return GPT(PRESETS[config.size], config.block_size).to(config.device)


def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-byte cross-entropy, in nats per byte."""
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[Tensor, Tensor]], device: str) -> float:
    """Mean loss of ``model`` over ``batches`` (nats/byte)."""
    was_training = model.training
    model.eval()
    losses = [lm_loss(model, x.to(device), y.to(device)).item() for x, y in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


# ---------------------------------------------------------------------------------------------
# Optimizers


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimizer of the ``--optimizer`` choice ``name``, as a user's script would build it.

    ``torch.optim.AdamW`` is looked up when called, not imported once, so that a patch applied
    before this call (``patch`` mode, or the ``python -m gefen_compile`` runner) takes effect.
    """
    kwargs = {"lr": lr, "betas": BETAS, "weight_decay": WEIGHT_DECAY}
    if name == "gefen":
        import gefen_compile

        return gefen_compile.Gefen(model.parameters(), **kwargs)
    if name in ("adamw", "backend", "patch"):
        return torch.optim.AdamW(model.parameters(), **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


@contextlib.contextmanager
def optimizer_mode(name: str) -> Iterator[None]:
    """What ``name`` needs around a whole run: ``patch`` patches ``torch.optim.AdamW`` to Gefen
    for the run's duration (undone even when the run fails); the others need nothing."""
    if name != "patch":
        yield
        return
    import gefen_compile

    gefen_compile.patch_adamw()
    try:
        yield
    finally:
        gefen_compile.unpatch_adamw()


def training_model(name: str, model: nn.Module) -> nn.Module:
    """The module the training loop calls: ``backend`` mode compiles it with the "gefen"
    backend, which converts the AdamW over its parameters to Gefen at the first step. The
    compiled module shares ``model``'s parameters, so evaluation keeps using ``model`` and
    never triggers a recompilation for eval mode or another batch shape."""
    if name == "backend":
        return torch.compile(model, backend="gefen")
    return model


def lr_schedule(steps: int) -> Any:
    """Linear warm-up, then cosine decay to :data:`MIN_LR_FRACTION` of the peak: the usual GPT
    schedule, as a multiplier of the base learning rate for ``LambdaLR``."""
    warmup = max(1, int(steps * WARMUP_FRACTION))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * cosine

    return factor


def state_bytes_per_param(optimizer: torch.optim.Optimizer, model: nn.Module) -> float:
    """Bytes of every tensor the optimizer keeps (``optimizer.state``'s values, plus a
    ``codebook`` attribute if it has one), per model parameter.

    Read from the optimizer object itself, the same way whatever its class, so the number
    does not depend on any optimizer's own bookkeeping.
    """
    nbytes = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor)
    )
    codebook = getattr(optimizer, "codebook", None)
    if isinstance(codebook, Tensor):
        nbytes += codebook.numel() * codebook.element_size()
    return nbytes / count_parameters(model)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (the tied head counts once, as ``model.parameters()`` yields it)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A one-line progress bar on stderr, stdlib only.

    On a terminal the line is redrawn in place (at most ~10 times a second); otherwise (a log
    file, CI) a line is printed about every 10% of the steps, so logs stay short.
    """

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.last_draw = 0.0
        self.last_decile = 0

    def update(self, step: int, loss: float, tokens_per_s: float, state_bpp: float) -> None:
        """Show progress after ``step`` (1-based) of ``total``."""
        width = 20
        filled = width * step // self.total
        line = (
            f"{self.label:>8} [{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} "
            f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  state {state_bpp:.3f} B/param"
        )
        if self.tty:
            now = time.monotonic()
            if step == self.total or now - self.last_draw >= 0.1:
                self.stream.write("\r" + line)
                self.stream.flush()
                self.last_draw = now
            return
        decile = 10 * step // self.total
        if decile > self.last_decile or step == 1:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_decile = decile

    def close(self) -> None:
        """End the in-place line, so later output starts on a fresh one."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class RunResult:
    """One optimizer's run: its summary (the ``--report`` JSON) and its per-step curve."""

    optimizer: str
    optimizer_class: str
    params: int
    steps: int
    final_train_loss: float
    final_val_loss: float
    state_bytes_per_param: float
    tokens_per_s: float
    train_seconds: float
    wall_seconds: float
    curve: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """Everything but the curve."""
        return {k: v for k, v in asdict(self).items() if k != "curve"}


def train(
    name: str,
    config: TrainConfig,
    data: tuple[Tensor, Tensor] | None = None,
    progress: bool = True,
) -> RunResult:
    """Train a fresh :func:`build_model` with optimizer choice ``name`` (see
    :data:`OPTIMIZERS`) for ``config.steps`` steps on batches drawn from ``config.seed``.

    ``data`` is :func:`load_corpus`'s ``(train, val)``, read here when not given. Validation loss
    is measured before the first step, every ``config.eval_interval`` steps and, on all
    :data:`FINAL_EVAL_BATCHES` batches, after the last.
    """
    if config.steps < 1:
        raise ValueError(f"steps must be >= 1, got {config.steps}")
    start_wall = time.perf_counter()
    train_data, val_data = data if data is not None else load_corpus()
    val_batches = validation_batches(val_data, config)
    model = build_model(config)
    tokens_per_step = config.batch_size * config.block_size
    bar = Progress(name, config.steps) if progress else None
    with optimizer_mode(name):
        optimizer = make_optimizer(name, model, config.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config.steps))
        step_model = training_model(name, model)
        generator = torch.Generator().manual_seed(config.seed)
        initial_val = evaluate(model, val_batches[:EVAL_BATCHES], config.device)
        curve = [_row(name, 0, None, initial_val, None, None)]
        train_seconds, state_bpp = 0.0, float("nan")
        for step in range(1, config.steps + 1):
            x, y = sample_batch(train_data, config.batch_size, config.block_size, generator)
            tic = time.perf_counter()
            loss = train_step(step_model, optimizer, scheduler, x.to(config.device),
                              y.to(config.device))
            seconds = time.perf_counter() - tic
            train_seconds += seconds
            if step == 1:
                # Gefen (and the backend's conversion) allocate their state at the first step.
                state_bpp = state_bytes_per_param(optimizer, model)
            val_loss = None
            if step == config.steps:
                val_loss = evaluate(model, val_batches, config.device)
            elif step % config.eval_interval == 0:
                val_loss = evaluate(model, val_batches[:EVAL_BATCHES], config.device)
            curve.append(_row(name, step, loss, val_loss, tokens_per_step / seconds, state_bpp))
            if bar is not None:
                bar.update(step, loss, step * tokens_per_step / train_seconds, state_bpp)
        if bar is not None:
            bar.close()
    recent = [row["train_loss"] for row in curve[-train_loss_window(config.steps):]]
    return RunResult(
        optimizer=name,
        optimizer_class=type(optimizer).__name__,
        params=count_parameters(model),
        steps=config.steps,
        final_train_loss=sum(recent) / len(recent),
        final_val_loss=curve[-1]["val_loss"],
        state_bytes_per_param=state_bpp,
        tokens_per_s=config.steps * tokens_per_step / train_seconds,
        train_seconds=train_seconds,
        wall_seconds=time.perf_counter() - start_wall,
        curve=curve,
    )


def train_loss_window(steps: int) -> int:
    """How many final steps the reported train loss averages: one batch's loss is too noisy to
    compare optimizers by, so the last 10% of the steps (at most 100)."""
    return min(100, max(1, steps // 10))


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    x: Tensor,
    y: Tensor,
) -> float:
    """One ordinary training step (forward, backward, clip, step, schedule); the batch loss.

    ``.item()`` waits for the device, so timing this call measures the step's real cost.
    """
    loss = lm_loss(model, x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    scheduler.step()
    return loss.item()


def _row(
    name: str,
    step: int,
    train_loss: float | None,
    val_loss: float | None,
    tokens_per_s: float | None,
    state_bpp: float | None,
) -> dict[str, Any]:
    """One line of ``curves.csv``; None where the value was not measured at this step."""
    return {
        "optimizer": name,
        "step": step,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "tokens_per_s": tokens_per_s,
        "state_bytes_per_param": state_bpp,
    }


def train_under_runner(config: TrainConfig) -> RunResult:
    """The ``runner`` choice: this script, unmodified, run by ``python -m gefen_compile`` with
    ``--optimizer adamw`` and ``config``'s settings in a child process, as a user runs their own
    script. The child's ``torch.optim.AdamW`` becomes Gefen there; its report and curves, read
    back here, make the run's :class:`RunResult`. Its progress shows on this stderr."""
    with tempfile.TemporaryDirectory(prefix="train_gpt_runner_") as tmp:
        out, report = Path(tmp), Path(tmp) / "report.json"
        command = [
            sys.executable, "-m", "gefen_compile", str(Path(__file__).resolve()),
            "--optimizer", "adamw", "--size", config.size, "--steps", str(config.steps),
            "--seed", str(config.seed), "--batch-size", str(config.batch_size),
            "--block-size", str(config.block_size), "--lr", repr(config.lr),
            "--eval-every", str(config.eval_every), "--device", config.device,
            # The same threads as this process, so the runs compare.
            "--threads", str(torch.get_num_threads()),
            "--out", str(out), "--report", str(report), "--no-plot",
        ]
        # Its header and table would repeat this process's; its progress bar (stderr) stays,
        # labelled "adamw", as the child sees its optimizer.
        print("  runner: python -m gefen_compile train_gpt.py --optimizer adamw ...",
              file=sys.stderr, flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        summary = json.loads(report.read_text())["runs"][0]
        curve = read_curve(out / "curves.csv")
    for row in curve:
        row["optimizer"] = "runner"
    return RunResult(**{**summary, "optimizer": "runner"}, curve=curve)


def compare(
    names: list[str],
    config: TrainConfig,
    data: tuple[Tensor, Tensor] | None = None,
    progress: bool = True,
) -> list[RunResult]:
    """:func:`train` once per optimizer choice in ``names`` (``runner``:
    :func:`train_under_runner`), one after the other, all from the same seed, data, initial
    weights and hyperparameters."""
    data = data if data is not None else load_corpus()
    return [
        train_under_runner(config) if name == "runner" else train(name, config, data, progress)
        for name in names
    ]


# ---------------------------------------------------------------------------------------------
# Output

CSV_COLUMNS = ("optimizer", "step", "train_loss", "val_loss", "tokens_per_s",
               "state_bytes_per_param")


def write_csv(results: list[RunResult], path: Path) -> None:
    """Every run's curve, one row per step (step 0: the validation loss before training);
    empty cells where a value was not measured at that step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in results:
            for row in result.curve:
                writer.writerow({k: "" if v is None else v for k, v in row.items()})


def read_curve(path: Path) -> list[dict[str, Any]]:
    """:func:`write_csv`'s rows back, as :func:`train` made them (None for empty cells)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))

    def number(text: str) -> float | None:
        return float(text) if text else None

    return [
        {"optimizer": row["optimizer"], "step": int(row["step"]),
         **{k: number(row[k]) for k in CSV_COLUMNS[2:]}}
        for row in rows
    ]


def plot(results: list[RunResult], path: Path, title: str = "") -> None:
    """Train (thin) and validation (thick, markers) loss vs step, one colour per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works with no display
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(
            "train_gpt: writing the loss plot needs matplotlib: pip install matplotlib "
            "(or pass --no-plot)"
        ) from error
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, result in enumerate(results):
        colour = f"C{i}"
        label = f"{result.optimizer} ({result.optimizer_class}, "
        label += f"{result.state_bytes_per_param:.2f} B/param)"
        train_pts = [(r["step"], r["train_loss"]) for r in result.curve if r["train_loss"]]
        val_pts = [(r["step"], r["val_loss"]) for r in result.curve if r["val_loss"]]
        ax.plot(*zip(*train_pts), color=colour, alpha=0.35, linewidth=0.8)
        ax.plot(*zip(*val_pts), color=colour, marker="o", linewidth=2, label=f"{label}: val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(title or "byte-level GPT on the Python standard library")
    ax.grid(alpha=0.3)
    ax.legend(title="thin: train loss")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_report(results: list[RunResult], config: TrainConfig, path: Path) -> None:
    """The ``--report`` JSON: the settings, and one summary per run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"config": asdict(config), "runs": [r.summary() for r in results]}
    path.write_text(json.dumps(report, indent=2) + "\n")


def format_table(results: list[RunResult]) -> str:
    """The final comparison: validation loss (and its ratio to the first run), train loss and
    optimizer-state bytes/param, one row per run. No speed: the runs are sequential, so a change
    in the machine's load would read as optimizer speed (benchmarks/bench_step.py measures the
    step side by side, interleaved)."""
    base = results[0].final_val_loss
    header = ("optimizer", "class", "val loss", f"/ {results[0].optimizer}", "train loss",
              "state B/param")
    rows = [header] + [
        (r.optimizer, r.optimizer_class, f"{r.final_val_loss:.4f}",
         f"{r.final_val_loss / base:.4f}", f"{r.final_train_loss:.4f}",
         f"{r.state_bytes_per_param:.3f}")
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:], widths[2:])]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: those options' help says where their default comes from."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=_HelpWithDefaults)
    parser.add_argument("--optimizer", nargs="+", choices=OPTIMIZERS, default=["adamw", "gefen"],
                        help="optimizer runs, one after the other (see the module docstring)")
    parser.add_argument("--size", choices=sorted(PRESETS), default="small",
                        help="model preset; it also sets the defaults of the next four")
    parser.add_argument("--steps", type=int, help="training steps per run (default: preset's)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: preset's)")
    parser.add_argument("--block-size", type=int, help="bytes per sequence (default: preset's)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: preset's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and batches")
    parser.add_argument("--eval-every", type=int, default=0,
                        help=f"steps between validation evaluations (0: {EVALS_PER_RUN} per run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (cuda where there is one)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default, one per core)")
    parser.add_argument("--out", type=Path, default=Path("runs/train_gpt"),
                        help="directory for curves.csv and loss.png")
    parser.add_argument("--report", type=Path, help="write a JSON summary of each run here")
    parser.add_argument("--no-plot", action="store_true", help="do not write loss.png")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of the command line, preset values where a flag is absent."""
    preset = PRESETS[args.size]

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return TrainConfig(
        size=args.size,
        steps=pick(args.steps, preset.steps),
        seed=args.seed,
        batch_size=pick(args.batch_size, preset.batch_size),
        block_size=pick(args.block_size, preset.block_size),
        lr=pick(args.lr, preset.lr),
        device=args.device,
        eval_every=args.eval_every,
    )


def describe(config: TrainConfig, data: tuple[Tensor, Tensor]) -> str:
    """The header printed before training: corpus, model and settings, and the two losses
    (uniform and unigram) that a model which learned nothing would score."""
    train_data, val_data = data
    preset = PRESETS[config.size]
    return (
        f"corpus: {len(STDLIB_FILES)} stdlib modules, {len(train_data):,} train / "
        f"{len(val_data):,} validation bytes\n"
        f"model: {config.size} GPT, {preset.n_layer} layers, {preset.n_head} heads, width "
        f"{preset.n_embd}, context {config.block_size}\n"
        f"training: {config.steps} steps x {config.batch_size} sequences, lr {config.lr} "
        f"(warm-up + cosine), betas {BETAS}, weight decay {WEIGHT_DECAY}, seed {config.seed}, "
        f"{config.device}, {torch.get_num_threads()} thread(s)\n"
        f"reference losses: uniform log(256) = {math.log(VOCAB):.3f}, unigram "
        f"{unigram_entropy(train_data):.3f} nats/byte"
    )


def main(argv: list[str] | None = None) -> list[RunResult]:
    """Run the comparison the command line asks for, print its table and write its files."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    data = load_corpus()
    print(describe(config, data), flush=True)
    results = compare(args.optimizer, config, data)
    print(f"\n{results[0].params:,} parameters; final validation loss on "
          f"{FINAL_EVAL_BATCHES} held-out batches\n")
    print(format_table(results))
    write_csv(results, args.out / "curves.csv")
    written = [args.out / "curves.csv"]
    if not args.no_plot:
        plot(results, args.out / "loss.png")
        written.append(args.out / "loss.png")
    if args.report:
        write_report(results, config, args.report)
        written.append(args.report)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return results


if __name__ == "__main__":
    main()
