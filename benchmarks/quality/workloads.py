"""The six workloads: what is trained, for how long, and how each run is scored.

Each workload turns (optimizer name, seed, quick) into :class:`Run` records. Everything random
(weights, batches, data) is drawn from the seed before or beside the optimizer, never from it,
so the three optimizers of a seed start from the same weights and see the same batches; only
the optimizer's arithmetic differs. Hyperparameters are AdamW's usual ones for each kind of
model and are the same for the three optimizers (Muon's take them through "match_rms_adamw").
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import data, models, optimizers
from .data import train_gpt

# A run diverged when its final loss is not finite or is above this multiple of its initial one.
DIVERGENCE_FACTOR = 10.0


@dataclass
class Run:
    """One optimizer's training run: its final score and its per-step curve.

    ``curve`` rows are ``(step, train_loss, val_loss)``, None where not measured; step 0 is the
    model before training. ``final_loss`` is the workload's score (validation loss, or for the
    MLPs the full-batch training loss after the last step).
    """

    workload: str
    optimizer: str
    seed: int
    config: str = ""  # which member of a family (the MLPs); empty otherwise
    params: int = 0
    initial_loss: float = math.nan
    final_loss: float = math.nan
    state_bytes_per_param: float = math.nan
    seconds: float = math.nan
    cpu_seconds: float = math.nan
    curve: list[tuple[int, float | None, float | None]] = field(default_factory=list, repr=False)
    error: str = ""  # the exception, when the run crashed instead of finishing

    @property
    def diverged(self) -> bool:
        return not self.error and (
            not math.isfinite(self.final_loss)
            or self.final_loss > DIVERGENCE_FACTOR * self.initial_loss
        )


@dataclass(frozen=True)
class Workload:
    """A named task: ``train(optimizer, seed, quick)`` gives its runs for that seed (one, or a
    family's worth); ``describe(quick)`` says in a sentence or two what it trains and how."""

    name: str
    title: str
    loss_name: str
    train: Callable[[str, int, bool], list[Run]]
    describe: Callable[[bool], str]
    log_scale: bool = False  # plot losses on a log axis (losses spanning decades)
    # Which curves the plot shows: "val" alone where the train loss is of another scale
    # (a classifier that fits its train set), "train" alone where it is the score (the MLPs).
    plotted: tuple[str, ...] = ("train", "val")
    smooth: bool = True  # smooth the train curve: mini-batch losses are noisy, full-batch not
    optimizers: tuple[str, ...] = optimizers.GEFEN_CONTEST  # its contestants, in plot order
    reference: str = "adamw"  # the contestant every other one's loss is divided by
    contest: str = "AdamW vs Gefen (robust, published)"  # for the summary's title


@contextlib.contextmanager
def _timed(run: Run) -> Iterator[None]:
    """Fill ``run``'s wall and CPU seconds around the block; a crash becomes ``run.error``
    (printed), so one failed run does not end a half-hour suite."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    except Exception as error:  # noqa: BLE001: recorded in the report, the suite goes on
        traceback.print_exc()
        run.error = f"{type(error).__name__}: {error}"
    run.seconds = time.perf_counter() - wall
    run.cpu_seconds = time.process_time() - cpu


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


# ---------------------------------------------------------------------------------------------
# 1. examples/train_gpt.py at its defaults

TRAIN_GPT_QUICK = ["--size", "tiny", "--steps", "20"]


@functools.cache
def _byte_corpus() -> tuple[Tensor, Tensor]:
    return train_gpt.load_corpus()


def _train_gpt_config(seed: int, quick: bool) -> train_gpt.TrainConfig:
    """The example's own command line with only ``--seed`` (and, quick, a tiny size): its
    defaults exactly, whatever they become."""
    argv = ["--seed", str(seed), *(TRAIN_GPT_QUICK if quick else [])]
    return train_gpt.config_from_args(train_gpt.parse_args(argv))


@contextlib.contextmanager
def _train_gpt_builds(name: str, built: list[torch.optim.Optimizer]) -> Iterator[None]:
    """``train_gpt.train`` with its optimizer built by :func:`optimizers.build` (it knows AdamW
    and the default Gefen only): its ``make_optimizer`` is swapped for the run, with the same
    arguments it would pass, and the optimizer is kept in ``built`` for the state report."""
    original = train_gpt.make_optimizer

    def make(_: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        optimizer = optimizers.build(name, model.parameters(), lr=lr, betas=train_gpt.BETAS,
                                     weight_decay=train_gpt.WEIGHT_DECAY)
        built.append(optimizer)
        return optimizer

    train_gpt.make_optimizer = make
    try:
        yield
    finally:
        train_gpt.make_optimizer = original


def train_byte_gpt(name: str, seed: int, quick: bool) -> list[Run]:
    """``train_gpt.train`` itself (its model, batches, schedule, evaluations and scoring), with
    the optimizer ``name``; the run's score is its final validation loss."""
    run = Run("gpt", name, seed)
    with _timed(run):
        built: list[torch.optim.Optimizer] = []
        with _train_gpt_builds(name, built):
            result = train_gpt.train(name, _train_gpt_config(seed, quick), _byte_corpus(),
                                     progress=False)
        run.params = result.params
        run.curve = [(r["step"], r["train_loss"], r["val_loss"]) for r in result.curve]
        run.initial_loss = result.curve[0]["val_loss"]
        run.final_loss = result.final_val_loss
        run.state_bytes_per_param = optimizers.state_bytes_per_param(built[0])
    return [run]


def describe_byte_gpt(quick: bool) -> str:
    config = _train_gpt_config(0, quick)
    preset = train_gpt.PRESETS[config.size]
    how = "tiny preset, quick" if quick else "its defaults"
    return (
        f"`examples/train_gpt.py` at {how}: byte-level GPT ({preset.n_layer} layers, width "
        f"{preset.n_embd}) on the stdlib corpus, context {config.block_size}, {config.steps} steps "
        f"of {config.batch_size}, peak lr {config.lr} (warm-up + cosine), betas "
        f"{train_gpt.BETAS}, weight decay {train_gpt.WEIGHT_DECAY}, clip {train_gpt.GRAD_CLIP}. "
        f"Validation loss (nats/byte) on {train_gpt.FINAL_EVAL_BATCHES} held-out batches."
    )


# ---------------------------------------------------------------------------------------------
# 2-3. GPT-2- and Llama-style models on BPE tokens of the same corpus


# Size and schedule of a BPE language-model workload, as train_gpt's presets give them (betas,
# weight decay, clipping and the lr schedule's shape are train_gpt's too).
LMSetting = train_gpt.Preset
LM_SETTINGS = {
    # Sized by the suite's ~30 min budget on 2 CPU cores, not by what would be a good model:
    # about 0.37 CPU-s per step (one thread), 9 runs per workload. Width 256 keeps weight
    # periods >= 256, as in train_gpt's presets. ~10M parameters (6 layers, width 384) cost
    # 2.3x per step: about +33 min of wall time for the two BPE workloads together.
    False: LMSetting(n_layer=4, n_head=4, n_embd=256, block_size=128, batch_size=8, steps=200,
                     lr=1e-3),
    True: LMSetting(n_layer=1, n_head=2, n_embd=64, block_size=32, batch_size=8, steps=20,
                    lr=3e-3),
}


def _lm_shape(setting: LMSetting, vocab_size: int) -> models.LMShape:
    return models.LMShape(setting.n_layer, setting.n_head, setting.n_embd, setting.block_size,
                          vocab_size)


def train_bpe_lm(workload: str, model_class: type[nn.Module], name: str, seed: int,
                 quick: bool) -> list[Run]:
    """``train_gpt.train``'s protocol on BPE tokens: validation before training, on
    ``EVAL_BATCHES`` fixed batches ``EVALS_PER_RUN`` times, and on all ``FINAL_EVAL_BATCHES``
    after the last step; the example's schedule, clipping and train step. A non-finite train
    loss ends the run (diverged)."""
    setting = LM_SETTINGS[quick]
    run = Run(workload, name, seed)
    with _timed(run):
        tokens = data.bpe_tokens()
        config = train_gpt.TrainConfig(steps=setting.steps, seed=seed,
                                       batch_size=setting.batch_size,
                                       block_size=setting.block_size, lr=setting.lr)
        val_batches = train_gpt.validation_batches(tokens.val, config)
        torch.manual_seed(seed)
        model = model_class(_lm_shape(setting, tokens.vocab_size))
        run.params = train_gpt.count_parameters(model)
        optimizer = optimizers.build_for_model(name, model, lr=config.lr, betas=train_gpt.BETAS,
                                               weight_decay=train_gpt.WEIGHT_DECAY)
        scheduler = optimizers.schedule(optimizer, train_gpt.lr_schedule(config.steps))
        generator = torch.Generator().manual_seed(seed)
        run.initial_loss = train_gpt.evaluate(model, val_batches[:train_gpt.EVAL_BATCHES], "cpu")
        run.curve.append((0, None, run.initial_loss))
        for step in range(1, config.steps + 1):
            x, y = train_gpt.sample_batch(tokens.train, config.batch_size, config.block_size,
                                          generator)
            loss = train_gpt.train_step(model, optimizer, scheduler, x, y)
            if step == 1:
                run.state_bytes_per_param = optimizers.state_bytes_per_param(optimizer)
            val = None
            if step == config.steps:
                val = run.final_loss = train_gpt.evaluate(model, val_batches, "cpu")
            elif step % config.eval_interval == 0:
                val = train_gpt.evaluate(model, val_batches[:train_gpt.EVAL_BATCHES], "cpu")
            run.curve.append((step, loss, val))
            if not math.isfinite(loss):
                break
    return [run]


def describe_bpe_lm(kind: str) -> Callable[[bool], str]:
    def describe(quick: bool) -> str:
        s = LM_SETTINGS[quick]
        return (
            f"{kind}, {s.n_layer} layers, {s.n_head} heads, width {s.n_embd}, on byte-level BPE "
            f"tokens (vocabulary {data.BPE_VOCAB}, trained on the train split) of the same "
            f"corpus; context {s.block_size}, {s.steps} steps of {s.batch_size}, peak lr {s.lr}, "
            f"otherwise train_gpt's schedule, betas, weight decay and clipping. Validation loss "
            f"(nats/token) on {train_gpt.FINAL_EVAL_BATCHES} held-out batches."
        )

    return describe


def describe_muon_lm(quick: bool) -> str:
    return (
        describe_bpe_lm("gpt2-bpe's model: GPT-2 style")(quick)
        + f" muon: `torch.optim.Muon` on the blocks' matrices (attention and MLP weights), "
        f"`torch.optim.AdamW` on the rest (embeddings, tied head, norms, biases); gefen-muon: "
        f"`gefen_compile.GefenMuon` and `gefen_compile.Gefen` in their places; adamw: AdamW on "
        f"everything. Muon: AdamW's lr and weight decay with adjust_lr_fn="
        f"\"{optimizers.MUON_ADJUST_LR}\" (Moonshot's recipe), momentum "
        f"{optimizers.MUON_MOMENTUM}, Nesterov; one LambdaLR schedule drives both optimizers "
        f"of a pair. State B/param of muon and gefen-muon: the matrices' momentum only "
        f"(Muon's fp32 buffer 4; GefenMuon's `memory_report`), not the rest's AdamW/Gefen state."
    )


# ---------------------------------------------------------------------------------------------
# 4. A small CNN with BatchNorm on scikit-learn's digits


@dataclass(frozen=True)
class DigitsSetting:
    width: int
    batch_size: int
    epochs: int
    lr: float


DIGITS_SETTINGS = {
    False: DigitsSetting(width=32, batch_size=64, epochs=30, lr=3e-3),
    True: DigitsSetting(width=8, batch_size=64, epochs=2, lr=3e-3),
}


@torch.no_grad()
def _classification_loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    loss = F.cross_entropy(model(x), y).item()
    model.train()
    return loss


def train_digits(name: str, seed: int, quick: bool) -> list[Run]:
    """Mini-batch training, a fresh shuffle per epoch from the seed; validation loss (eval mode:
    BatchNorm's running statistics) after every epoch."""
    setting = DIGITS_SETTINGS[quick]
    run = Run("digits-cnn", name, seed)
    with _timed(run):
        d = data.digits()
        torch.manual_seed(seed)
        model = models.DigitsCNN(setting.width)
        run.params = train_gpt.count_parameters(model)
        optimizer = optimizers.build(name, model.parameters(), lr=setting.lr,
                                     betas=(0.9, 0.999), weight_decay=0.01)
        n = len(d.y_train)
        per_epoch = math.ceil(n / setting.batch_size)
        steps = setting.epochs * per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train_gpt.lr_schedule(steps))
        generator = torch.Generator().manual_seed(seed)
        run.initial_loss = _classification_loss(model, d.x_val, d.y_val)
        run.curve.append((0, None, run.initial_loss))
        step = 0
        for _ in range(setting.epochs):
            order = torch.randperm(n, generator=generator)
            for batch in order.split(setting.batch_size):
                step += 1
                loss = F.cross_entropy(model(d.x_train[batch]), d.y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if step == 1:
                    run.state_bytes_per_param = optimizers.state_bytes_per_param(optimizer)
                val = None
                if step % per_epoch == 0:
                    val = _classification_loss(model, d.x_val, d.y_val)
                run.curve.append((step, loss.item(), val))
            if not _finite(run.curve[-1][1]):
                break
        run.final_loss = run.curve[-1][2] if run.curve[-1][2] is not None else math.nan
    return [run]


def describe_digits(quick: bool) -> str:
    s = DIGITS_SETTINGS[quick]
    d_train = len(data.digits().y_train)
    return (
        f"CNN (3 conv 3x3 + BatchNorm + ReLU, width {s.width}/{2 * s.width}/{2 * s.width}, "
        f"linear head) on `sklearn.datasets.load_digits` (8x8, {d_train} train / fixed 20% "
        f"validation); {s.epochs} epochs of batches of {s.batch_size}, peak lr {s.lr} (warm-up + "
        f"cosine), betas (0.9, 0.999), weight decay 0.01. Validation cross-entropy (nats)."
    )


# ---------------------------------------------------------------------------------------------
# 5. The 27 small MLPs: full-batch regression on random targets

MLP_SIZES = ((64, 32, 64, 8), (128, 16, 32, 4), (256, 64, 128, 10))  # samples, in, hidden, out
MLP_STEPS = {False: 200, True: 200}
MLP_LR = 1e-3


def train_mlps(name: str, seed: int, quick: bool) -> list[Run]:
    """The nine members of the family for ``seed``: every size x activation, full-batch MSE at
    lr 1e-3 (AdamW's other defaults). The score is the loss after the last step."""
    runs = []
    for samples, inputs, hidden, outputs in MLP_SIZES:
        x, y = data.random_regression(samples, inputs, outputs, seed)
        for activation in models.ACTIVATIONS:
            run = Run("mlp", name, seed, f"{samples}x{inputs}->{hidden}->{outputs} {activation}")
            with _timed(run):
                torch.manual_seed(seed)
                model = models.mlp(inputs, hidden, outputs, activation)
                run.params = train_gpt.count_parameters(model)
                optimizer = optimizers.build(name, model.parameters(), lr=MLP_LR,
                                             betas=(0.9, 0.999), weight_decay=0.01)
                for step in range(MLP_STEPS[quick]):
                    loss = F.mse_loss(model(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if step == 0:
                        run.initial_loss = loss.item()
                        run.curve.append((0, None, run.initial_loss))
                        run.state_bytes_per_param = optimizers.state_bytes_per_param(optimizer)
                    run.curve.append((step + 1, loss.item(), None))
                    if not math.isfinite(loss.item()):
                        break
                with torch.no_grad():
                    run.final_loss = F.mse_loss(model(x), y).item()
                step_, train, _ = run.curve[-1]
                run.curve[-1] = (step_, train, run.final_loss)
            runs.append(run)
    return runs


def describe_mlps(quick: bool) -> str:
    sizes = ", ".join(f"{n}x{i}->{h}->{o}" for n, i, h, o in MLP_SIZES)
    return (
        f"Family of 3 sizes ({sizes}: samples x inputs -> hidden -> outputs) x GELU/ReLU/Tanh "
        f"x the seeds; standard-normal inputs and targets from the seed, full-batch MSE, "
        f"{MLP_STEPS[quick]} steps at constant lr {MLP_LR}, betas (0.9, 0.999), weight decay "
        f"0.01. Score: the full-batch loss after the last step (\"val\" column in the curves). "
        f"Diverged: non-finite, or final loss above {DIVERGENCE_FACTOR:g}x the initial."
    )


# ---------------------------------------------------------------------------------------------

WORKLOADS = {
    w.name: w
    for w in (
        Workload("gpt", "examples/train_gpt.py (byte-level GPT)", "loss (nats/byte)",
                 train_byte_gpt, describe_byte_gpt),
        Workload("gpt2-bpe", "GPT-2-style on BPE tokens", "loss (nats/token)",
                 functools.partial(train_bpe_lm, "gpt2-bpe", models.GPT2),
                 describe_bpe_lm("GPT-2 style (learned positions, LayerNorm, GELU MLP, tied "
                                 "embedding)")),
        Workload("llama-bpe", "Llama-style on BPE tokens", "loss (nats/token)",
                 functools.partial(train_bpe_lm, "llama-bpe", models.Llama),
                 describe_bpe_lm("Llama style (RMSNorm, SwiGLU, rotary positions, no biases, "
                                 "untied head)")),
        Workload("gpt2-bpe-muon", "GPT-2-style on BPE tokens: Muon vs GefenMuon",
                 "loss (nats/token)",
                 functools.partial(train_bpe_lm, "gpt2-bpe-muon", models.GPT2), describe_muon_lm,
                 optimizers=optimizers.MUON_CONTEST, reference="muon",
                 contest="Muon vs GefenMuon vs AdamW"),
        Workload("digits-cnn", "CNN + BatchNorm on sklearn digits", "val loss (nats)",
                 train_digits, describe_digits, plotted=("val",)),
        Workload("mlp", "27 small MLPs, random regression", "MSE (full batch)",
                 train_mlps, describe_mlps, log_scale=True, plotted=("train",), smooth=False),
    )
}


def run_task(workload: str, optimizer: str, seed: int, quick: bool, threads: int) -> list[Run]:
    """One (workload, optimizer, seed) in a worker process with ``threads`` torch threads: the
    unit the command line hands to its process pool."""
    torch.set_num_threads(threads)
    return WORKLOADS[workload].train(optimizer, seed, quick)
