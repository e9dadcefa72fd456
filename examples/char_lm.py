"""Byte-level language model on the Python standard library's own source: AdamW vs Gefen.

Both optimizers train the same model from the same initial weights, on the same batches, with
the same hyperparameters; only the optimizer differs. The table printed at the end compares
their validation loss and the bytes of optimizer state they keep per parameter.

    python examples/char_lm.py                # default: 1500 steps each, well under a minute on CPU
    python examples/char_lm.py --steps 3000 --seed 1 --lr 2e-3 --threads 2

The corpus is a fixed set of standard-library modules, so the example needs no download and
runs anywhere CPython 3.10+ and torch are installed.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
from torch import Tensor, nn

import gefen_compile
from stdlib_text import read_stdlib_files

# Large modules present in every CPython 3.10+ as plain .py files (pathlib is left out: it
# became a package in 3.13). Sorted, so the corpus is the same on every run.
STDLIB_FILES = (
    "argparse.py",
    "collections/__init__.py",
    "dataclasses.py",
    "enum.py",
    "functools.py",
    "inspect.py",
    "typing.py",
)
VOCAB = 256  # bytes, so any text (and any encoding) is in-vocabulary
CONTEXT = 8
EMBED_DIM = 32
HIDDEN = 256
BATCH_SIZE = 128
VAL_FRACTION = 0.1
# The validation batches are drawn once from this seed, whatever the training seed, so every
# run is scored on the same held-out examples.
VAL_SEED = 1234
VAL_BATCHES = 16
VAL_BATCH_SIZE = 512
# The reported train loss averages the last steps: one batch's loss is too noisy to compare.
TRAIN_LOSS_WINDOW = 100

DEFAULT_STEPS = 1500
DEFAULT_LR = 3e-3
# Shared by both optimizers; these are AdamW's defaults apart from lr.
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01


def load_corpus() -> tuple[Tensor, Tensor]:
    """The standard-library sources in :data:`STDLIB_FILES`, concatenated, as uint8 tensors:
    the first 90% for training and the last 10% held out for validation."""
    data = b"".join(read_stdlib_files(STDLIB_FILES, "char_lm"))
    corpus = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    split = int(len(corpus) * (1 - VAL_FRACTION))
    return corpus[:split].clone(), corpus[split:].clone()


class ByteMLP(nn.Module):
    """Next-byte predictor: the last :data:`CONTEXT` bytes, embedded and concatenated, through a
    one-hidden-layer MLP to :data:`VOCAB` logits (Bengio et al. 2003, at byte level)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED_DIM)
        self.hidden = nn.Linear(CONTEXT * EMBED_DIM, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.out = nn.Linear(HIDDEN, VOCAB)

    def forward(self, context: Tensor) -> Tensor:
        """Logits of shape ``(batch, VOCAB)`` for ``context`` of shape ``(batch, CONTEXT)``."""
        x = self.embed(context).flatten(1)
        return self.out(torch.nn.functional.gelu(self.norm(self.hidden(x))))


def build_model(seed: int) -> ByteMLP:
    """A freshly initialised :class:`ByteMLP`; the same ``seed`` gives the same weights."""
    torch.manual_seed(seed)
    return ByteMLP()


def sample_batch(
    data: Tensor, batch_size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``batch_size`` random windows of ``data``: contexts ``(batch, CONTEXT)`` and next bytes."""
    starts = torch.randint(0, len(data) - CONTEXT, (batch_size,), generator=generator)
    offsets = torch.arange(CONTEXT + 1)
    windows = data[starts.unsqueeze(1) + offsets].long()
    return windows[:, :CONTEXT], windows[:, CONTEXT]


def validation_batches(val: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The fixed held-out batches every run is scored on."""
    generator = torch.Generator().manual_seed(VAL_SEED)
    return [sample_batch(val, VAL_BATCH_SIZE, generator) for _ in range(VAL_BATCHES)]


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    """Mean cross-entropy (nats per byte) of ``model`` over ``batches``."""
    was_training = model.training
    model.eval()
    losses = [nn.functional.cross_entropy(model(x), y).item() for x, y in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` or ``gefen_compile.Gefen`` over ``model``, same hyperparameters."""
    kwargs: dict[str, Any] = {"lr": lr, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY}
    # Named parameters let memory_report label its rows with the module paths.
    params = list(model.named_parameters())
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name == "gefen":
        return gefen_compile.Gefen(params, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; use 'adamw' or 'gefen'")


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of tensors the optimizer keeps in its state, per parameter it updates.

    Counted from ``optimizer.state`` directly, the same way for both optimizers, so neither
    number relies on the other's bookkeeping.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    nbytes = sum(
        value.nbytes
        for p in params
        for value in optimizer.state.get(p, {}).values()
        if isinstance(value, Tensor)
    )
    return nbytes / sum(p.numel() for p in params)


def train(optimizer_name: str, steps: int, seed: int, lr: float = DEFAULT_LR) -> dict[str, Any]:
    """Train a fresh :func:`build_model` ``(seed)`` for ``steps`` steps with ``optimizer_name``
    (``"adamw"`` or ``"gefen"``) on batches drawn from a generator seeded with ``seed``.

    Returns a dict with ``train_loss`` (mean of the last :data:`TRAIN_LOSS_WINDOW` batch losses),
    ``val_loss`` (mean over the fixed validation batches, after the last step),
    ``state_bytes_per_param``, ``params``, ``seconds`` (wall time of the training loop) and
    ``optimizer`` (the optimizer itself, e.g. for :func:`gefen_compile.memory_report`).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    train_data, val_data = load_corpus()
    val_batches = validation_batches(val_data)
    model = build_model(seed)
    optimizer = make_optimizer(optimizer_name, model, lr)
    generator = torch.Generator().manual_seed(seed)
    recent: list[float] = []
    start = time.perf_counter()
    for _ in range(steps):
        x, y = sample_batch(train_data, BATCH_SIZE, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent.append(loss.item())
        if len(recent) > TRAIN_LOSS_WINDOW:
            recent.pop(0)
    seconds = time.perf_counter() - start
    return {
        "optimizer_name": optimizer_name,
        "train_loss": sum(recent) / len(recent),
        "val_loss": evaluate(model, val_batches),
        "state_bytes_per_param": state_bytes_per_param(optimizer),
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "optimizer": optimizer,
    }


def format_comparison(adamw: dict[str, Any], gefen: dict[str, Any]) -> str:
    """The AdamW-vs-Gefen table printed by :func:`main`."""
    rows = [
        ("", "AdamW", "Gefen", "Gefen / AdamW"),
        ("train loss (nats/byte)", f"{adamw['train_loss']:.4f}", f"{gefen['train_loss']:.4f}",
         f"{gefen['train_loss'] / adamw['train_loss']:.4f}"),
        ("val loss (nats/byte)", f"{adamw['val_loss']:.4f}", f"{gefen['val_loss']:.4f}",
         f"{gefen['val_loss'] / adamw['val_loss']:.4f}"),
        ("optimizer state bytes/param", f"{adamw['state_bytes_per_param']:.3f}",
         f"{gefen['state_bytes_per_param']:.3f}",
         f"{gefen['state_bytes_per_param'] / adamw['state_bytes_per_param']:.4f}"),
        ("training time (s)", f"{adamw['seconds']:.1f}", f"{gefen['seconds']:.1f}",
         f"{gefen['seconds'] / adamw['seconds']:.2f}"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Train with AdamW, then with Gefen (same seed, batches and hyperparameters), and print
    the comparison and Gefen's per-tensor memory report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="training steps per optimizer"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the weights and the batch order"
    )
    parser.add_argument(
        "--lr", type=float, default=DEFAULT_LR, help="learning rate of both optimizers"
    )
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: a second gains nothing on ops this small, and on "
             "a shared machine one waiting for a busy core made steps up to 20x slower)"
    )
    args = parser.parse_args(argv)
    # Every op of this model is small enough that a second thread gains nothing measurable,
    # while on a shared machine a thread waiting for a busy core made each step up to 20x
    # slower (OpenMP joins at every op).
    torch.set_num_threads(args.threads)

    train_data, val_data = load_corpus()
    print(
        f"corpus: {len(STDLIB_FILES)} stdlib modules, {len(train_data):,} train / "
        f"{len(val_data):,} validation bytes; {args.steps} steps of {BATCH_SIZE} windows, "
        f"lr={args.lr}, betas={BETAS}, weight_decay={WEIGHT_DECAY}, seed={args.seed}, "
        f"{args.threads} thread(s)"
    )
    print(f"uniform guess: log(256) = {math.log(VOCAB):.4f} nats/byte\n")
    results = {}
    for name in ("adamw", "gefen"):
        results[name] = train(name, args.steps, args.seed, args.lr)
        print(f"{name}: val loss {results[name]['val_loss']:.4f} "
              f"({results[name]['seconds']:.1f} s)")
    print(f"\n{results['adamw']['params']:,} parameters\n")
    print(format_comparison(results["adamw"], results["gefen"]))
    print("\nGefen optimizer state, per tensor:\n")
    print(gefen_compile.memory_report(results["gefen"]["optimizer"]))


if __name__ == "__main__":
    main()
