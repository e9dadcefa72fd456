"""Period rules for tensors whose rows have very different gradient scales (embeddings, tied
heads), decided by the tensor's shape only: quality on examples/train_gpt.py, cost elsewhere.

    python benchmarks/embedding_periods.py train [--rules R ...] [--seeds S ...] [--workers N]
                                                 [--steps N] [--json FILE]
    python benchmarks/embedding_periods.py shapes [--json FILE]

A *rule* post-processes the period that GEFEN_SPEC's inference picks from a tensor's first
gradient, as a function of the tensor's shape and that period only; it is installed by wrapping
``gefen_compile.learned_state.read_first_gradients`` (the one place the optimizer reads
periods), so the optimizer, its kernels and its state are the real ``gefen_compile.Gefen``.
``row`` below is the length of one row of the tensor seen as a ``(shape[0], -1)`` matrix:
``shape[-1]`` for a 2-D tensor (an embedding's token row; an ``nn.Linear`` weight's output
unit), ``in * kh * kw`` for a conv weight (the package's robust rule, ``variant.py``, takes the
last dimension of a 3-D+ tensor where it is longer than 8). 1-D tensors are never changed.

- ``published``: the inferred period, unchanged.
- ``gcd_last``: blocks never straddle the last dimension: P <- gcd(P, shape[-1]) (2-D+). Tried
  before on another model without gain; note it turns a 3x3 conv weight's period into 1 or 3.
- ``maxdim``: the authors' off-by-default cap, as read here: where P > max(shape), P <- the
  largest divisor of P that is <= max(shape).
- ``rows``: a block never spans more than one row: where P > row, P <- row.
- ``rows64``: as ``rows``, but such a tensor's row is cut into blocks of 64 (the largest divisor
  of row <= 64): does structure within a row matter?
- ``element``: as ``rows``, but such a tensor gets period 1 (a per-element second moment,
  ~5 bytes/param for it).

``train`` runs train_gpt.py's default comparison (its model, data, batches, schedule, clipping,
weight decay; ``train_gpt.train``) with AdamW and with Gefen under each rule, one process per
run (one torch thread each, ``--workers`` side by side, niced), and prints per rule: the final
validation loss per seed, the mean, the mean of the paired (same seed) excess over AdamW, and
Gefen's optimizer-state bytes/param (``gefen_compile.memory_report``) with the tensors the rule
changed. ``shapes`` needs no training: it reads the periods Gefen infers from one first gradient
of train_gpt's model, GPT-2 small (HF ``GPT2LMHeadModel``, random init, Zipf-distributed token
ids), a TinyLlama-shaped model (2 of its 22 layers, extrapolated) and a ResNet-18-shaped conv
net (random images), applies every rule, and prints which tensors each rule changes and the
state bytes/param it costs (robust layout, fp32 and bf16 state). Results:
benchmarks/results/embedding_periods.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

Shape = tuple[int, ...]
Rule = Callable[[Shape, int], int]

# The published inference never picks a period in 2..8 (a peak needs p > 8); rules that shrink
# a period to a row leave tensors whose rows are that short alone (per-row blocks there would
# cost more than 1 byte/param of second moments in fp32).
MIN_ROW = 9


def row_length(shape: Shape) -> int | None:
    """Elements in one row of the tensor seen as ``(shape[0], -1)``; None for 0-D/1-D."""
    if len(shape) < 2:
        return None
    return math.prod(shape[1:])


def _published(shape: Shape, period: int) -> int:
    return period


def _gcd_last(shape: Shape, period: int) -> int:
    return math.gcd(period, shape[-1]) if len(shape) >= 2 else period


def _maxdim(shape: Shape, period: int) -> int:
    if len(shape) < 2 or period <= max(shape):
        return period
    return max(d for d in range(1, max(shape) + 1) if period % d == 0)


def _spans_rows(shape: Shape, period: int) -> bool:
    row = row_length(shape)
    return row is not None and row >= MIN_ROW and period > row


def _rows(shape: Shape, period: int) -> int:
    return row_length(shape) if _spans_rows(shape, period) else period


def _rows64(shape: Shape, period: int) -> int:
    if not _spans_rows(shape, period):
        return period
    row = row_length(shape)
    return max(d for d in range(1, 65) if row % d == 0)


def _element(shape: Shape, period: int) -> int:
    return 1 if _spans_rows(shape, period) else period


RULES: dict[str, Rule] = {
    "published": _published,
    "gcd_last": _gcd_last,
    "maxdim": _maxdim,
    "rows": _rows,
    "rows64": _rows64,
    "element": _element,
}


@contextlib.contextmanager
def period_rule(rule: Rule, log: list | None = None) -> Iterator[None]:
    """Every Gefen built inside uses ``rule(shape, inferred period)`` as a tensor's period.
    ``log`` collects ``(shape, inferred, used)`` per tensor."""
    import gefen_compile.learned_state as learned_state
    from gefen_compile.variant import PUBLISHED

    inner = learned_state.read_first_gradients

    def read_first_gradients(grads, variant):
        # The rule replaces the variant's own choice: it acts on the inferred period.
        periods, *rest = inner(grads, PUBLISHED)  # (periods, finite, nonzero): only periods
        used = [rule(tuple(g.shape), p) for g, p in zip(grads, periods)]
        for g, p, q in zip(grads, periods, used):
            if g.numel() % q:
                raise AssertionError(f"rule gave period {q} for {tuple(g.shape)}")
            if log is not None:
                log.append((tuple(g.shape), p, q))
        return (used, *rest)

    learned_state.read_first_gradients = read_first_gradients
    try:
        yield
    finally:
        learned_state.read_first_gradients = inner


# ---------------------------------------------------------------------------------------------
# train


def run_one(rule_name: str, seed: int, steps: int | None) -> dict:
    """One train_gpt run (``adamw``, or Gefen under ``rule_name``), as a JSON-able dict."""
    import train_gpt as T

    from gefen_compile import memory_report

    preset = T.PRESETS["small"]
    config = T.TrainConfig(seed=seed, steps=steps or preset.steps)
    made = {}
    inner_make = T.make_optimizer

    def make_optimizer(name, model, lr):
        made["optimizer"] = inner_make(name, model, lr)
        return made["optimizer"]

    T.make_optimizer = make_optimizer
    log: list = []
    optimizer = "adamw" if rule_name == "adamw" else "gefen"
    rule = period_rule(RULES[rule_name], log) if optimizer == "gefen" else contextlib.nullcontext()
    with rule:
        result = T.train(optimizer, config, progress=False)
    out = {
        "rule": rule_name, "seed": seed, "steps": config.steps,
        "val_loss": result.final_val_loss, "train_loss": result.final_train_loss,
        "train_gpt_state_bytes_per_param": result.state_bytes_per_param,
        "wall_seconds": result.wall_seconds,
        "val_curve": [(r["step"], r["val_loss"]) for r in result.curve
                      if r["val_loss"] is not None],
    }
    if optimizer == "gefen":
        if not log:
            raise AssertionError(
                "the period hook was never called: the optimizer no longer reads periods "
                "through gefen_compile.learned_state.read_first_gradients")
        out["state_bytes_per_param"] = memory_report(made["optimizer"]).gefen_bytes_per_param
        out["changed"] = [(list(s), p, q) for s, p, q in log if p != q]
    return out


def train_all(args: argparse.Namespace) -> list[dict]:
    """Every (rule, seed) run not already in ``args.json`` (resumable: each result is written
    there as it arrives)."""
    results = []
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)
    have = {(r["rule"], r["seed"]) for r in results}
    # Seed by seed, so that a run cut short still leaves complete, paired seeds.
    jobs = [(r, s) for s in args.seeds for r in ("adamw", *args.rules) if (r, s) not in have]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = []
    start = time.perf_counter()
    while jobs or running:
        while jobs and len(running) < args.workers:
            rule, seed = jobs.pop(0)
            command = ["nice", "-n", "10", sys.executable, os.path.abspath(__file__), "one",
                       "--rule", rule, "--seed", str(seed)]
            if args.steps:
                command += ["--steps", str(args.steps)]
            running.append(subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True))
        done = [p for p in running if p.poll() is not None]
        for p in done:
            running.remove(p)
            out, _ = p.communicate()
            if p.returncode:
                raise SystemExit(f"run failed: {p.args}")
            results.append(json.loads(out.strip().splitlines()[-1]))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
            r = results[-1]
            print(f"[{time.perf_counter() - start:6.0f}s] {r['rule']:>9} seed {r['seed']}: "
                  f"val {r['val_loss']:.4f} ({r['wall_seconds']:.0f}s)", file=sys.stderr,
                  flush=True)
        time.sleep(0.5)
    return results


def train_table(results: list[dict]) -> str:
    adamw = {r["seed"]: r["val_loss"] for r in results if r["rule"] == "adamw"}
    seeds = sorted(adamw)
    rules = list(dict.fromkeys(r["rule"] for r in results))
    header = ["rule"] + [f"seed {s}" for s in seeds] + ["mean", "vs AdamW (paired mean)",
                                                        "per seed", "state B/param (per seed)",
                                                        "changed tensors"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rule in rules:
        runs = {r["seed"]: r for r in results if r["rule"] == rule}
        losses = [runs[s]["val_loss"] for s in seeds if s in runs]
        excess = [100 * (runs[s]["val_loss"] / adamw[s] - 1) for s in seeds if s in runs]
        # A run taken from elsewhere (its "source") is marked with a star.
        row = [rule] + [f"{runs[s]['val_loss']:.4f}" + ("*" if "source" in runs[s] else "")
                        if s in runs else "" for s in seeds]
        row.append(f"{statistics.mean(losses):.4f}")
        if rule == "adamw":
            row += ["", "", "8.000", ""]
        else:
            row.append(f"{statistics.mean(excess):+.2f}%")
            row.append(", ".join(f"{e:+.2f}%" for e in excess))
            bpp = [runs[s]["state_bytes_per_param"] for s in seeds if s in runs]
            row.append(" / ".join(f"{b:.3f}" for b in bpp))
            changed = dict.fromkeys(f"{'x'.join(map(str, shape))}: {p} -> {q}"
                                    for s in seeds if s in runs
                                    for shape, p, q in runs[s]["changed"])
            row.append("; ".join(changed) or "none")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# shapes


def state_bytes(n: int, period: int, itemsize: int) -> int:
    """Gefen's state bytes for an ``n``-element tensor of ``period`` (robust layout: period-1
    magnitude blocks of 256, the last one shorter; the 4-byte step counter not counted)."""
    if period > 1:
        return n + 2 * (n // period) * itemsize
    return n + (math.ceil(n / 256) + n) * itemsize


def first_gradients_train_gpt() -> list[tuple[str, torch.Tensor]]:
    import train_gpt as T

    config = T.TrainConfig()
    train_data, _ = T.load_corpus()
    model = T.build_model(config)
    x, y = T.sample_batch(train_data, config.batch_size, config.block_size,
                          torch.Generator().manual_seed(config.seed))
    T.lm_loss(model, x, y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), T.GRAD_CLIP)
    return [(n, p.grad) for n, p in model.named_parameters()]


def zipf_tokens(vocab: int, shape: Shape, generator: torch.Generator,
                shuffle: bool = False) -> torch.Tensor:
    """Token ids with P(id = r) proportional to 1 / (r + 1): BPE vocabularies are numbered
    roughly by merge order, so frequent tokens have small ids. ``shuffle``: frequency ranks
    assigned to ids at random instead (adjacent rows then differ most)."""
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    ids = torch.multinomial(weights, math.prod(shape), replacement=True, generator=generator)
    if shuffle:
        ids = torch.randperm(vocab, generator=generator)[ids]
    return ids.view(shape)


def first_gradients_hf(model: torch.nn.Module, vocab: int,
                       shuffle: bool = False) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = zipf_tokens(vocab, (4, 128), generator, shuffle)
    model(input_ids=ids, labels=ids).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    return [(n, p.grad) for n, p in model.named_parameters()]


def gpt2_small() -> tuple[torch.nn.Module, int]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config()  # 124M: vocab 50257, 12 layers, width 768, context 1024, tied head
    return GPT2LMHeadModel(config), config.vocab_size


def tinyllama_2_layers() -> tuple[torch.nn.Module, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                         num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config), config.vocab_size


def resnet18_shaped() -> torch.nn.Module:
    """ResNet-18's layers and shapes (no torchvision here), ImageNet head."""
    from torch import nn

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers)

    class Residual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = block(cin, cout, stride)
            self.skip = (nn.Identity() if cin == cout and stride == 1 else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout)))

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    torch.manual_seed(0)
    stages, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages += [Residual(cin, cout, stride), Residual(cout, cout, 1)]
        cin = cout
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(512, 1000))


def first_gradients_resnet() -> list[tuple[str, torch.Tensor]]:
    model = resnet18_shaped()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 64, 64, generator=generator)
    y = torch.randint(0, 1000, (16,), generator=generator)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return [(n, p.grad) for n, p in model.named_parameters()]


def layer_multiplier(name: str, layers: int, total: int) -> int:
    """How many tensors of the full model the tensor ``name`` of a truncated one stands for."""
    return total // layers if ".layers." in name else 1


def shapes_report(names: list[str]) -> dict:
    from gefen_compile.first_step import read_first_gradients
    from gefen_compile.variant import PUBLISHED

    models = {
        "train_gpt (default, 3.3M)": (first_gradients_train_gpt, 1, 1),
        "GPT-2 small (124M, tied; Zipf ids by rank)":
            (lambda: first_gradients_hf(*gpt2_small()), 1, 1),
        "GPT-2 small (124M, tied; Zipf ids shuffled)":
            (lambda: first_gradients_hf(*gpt2_small(), shuffle=True), 1, 1),
        "TinyLlama shapes (1.1B, 2 of 22 layers read)":
            (lambda: first_gradients_hf(*tinyllama_2_layers()), 2, 22),
        "ResNet-18 shapes (11.7M)": (first_gradients_resnet, 1, 1),
    }
    report = {}
    for model_name, (gradients, layers, total) in models.items():
        named = gradients()
        with torch.no_grad():
            periods = read_first_gradients([g for _, g in named], PUBLISHED)[0]
        tensors = [(n, tuple(g.shape), g.numel(), p, layer_multiplier(n, layers, total))
                   for (n, g), p in zip(named, periods)]
        del named
        numel = sum(k * m for _, _, k, _, m in tensors)
        entry = {"params": numel, "rules": {},
                 "tensors": [(n, list(s), p, m) for n, s, _, p, m in tensors]}
        base = None
        for rule_name in names:
            rule = RULES[rule_name]
            used = [(n, s, k, p, rule(s, p), m) for n, s, k, p, m in tensors]
            fp32 = sum(m * state_bytes(k, q, 4) for _, _, k, _, q, m in used) / numel
            bf16 = sum(m * state_bytes(k, q, 2) for _, _, k, _, q, m in used) / numel
            base = base or (fp32, bf16)
            entry["rules"][rule_name] = {
                "fp32": fp32, "bf16": bf16, "fp32_delta": fp32 - base[0],
                "bf16_delta": bf16 - base[1],
                "changed": [(n, list(s), p, q, m) for n, s, _, p, q, m in used if p != q],
            }
        report[model_name] = entry
        print(f"{model_name}: {numel:,} params", file=sys.stderr, flush=True)
    return report


def shapes_table(report: dict) -> str:
    lines = []
    for model_name, entry in report.items():
        lines += [f"**{model_name}** ({entry['params']:,} parameters)", "",
                  "| rule | B/param fp32 state | delta | B/param bf16 state | delta | "
                  "tensors changed (shape: inferred -> used, x count) |",
                  "|---|---|---|---|---|---|"]
        for rule_name, r in entry["rules"].items():
            changed = {}
            for n, s, p, q, m in r["changed"]:
                key = f"{'x'.join(map(str, s))}: {p} -> {q}"
                changed[key] = changed.get(key, 0) + m
            text = "; ".join(f"{k} (x{c})" for k, c in changed.items()) or "none"
            lines.append(f"| {rule_name} | {r['fp32']:.4f} | {r['fp32_delta']:+.4f} | "
                         f"{r['bf16']:.4f} | {r['bf16_delta']:+.4f} | {text} |")
        periods = {}
        for _, s, p, m in entry["tensors"]:
            if len(s) >= 2:
                key = f"{'x'.join(map(str, s))}: {p}"
                periods[key] = periods.get(key, 0) + m
        lines += ["", "Inferred periods of its 2-D+ tensors: "
                  + "; ".join(f"{k} (x{c})" for k, c in periods.items()), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train_gpt runs under several rules")
    train.add_argument("--rules", nargs="+", choices=sorted(RULES),
                       default=["published", "rows", "rows64", "element"])
    train.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    train.add_argument("--workers", type=int, default=2)
    train.add_argument("--steps", type=int, help="default: train_gpt's (800)")
    train.add_argument("--json", help="every run's result, written as it arrives; runs already "
                       "there are not run again")
    one = sub.add_parser("one", help="one run; prints a JSON line (used by train)")
    one.add_argument("--rule", choices=["adamw", *RULES], required=True)
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--steps", type=int)
    table = sub.add_parser("table", help="print the train table of a --json file")
    table.add_argument("json")
    shapes = sub.add_parser("shapes", help="periods and bytes/param of other models, per rule")
    shapes.add_argument("--rules", nargs="+", choices=sorted(RULES), default=list(RULES))
    shapes.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)

    if args.command == "one":
        torch.set_num_threads(1)
        print(json.dumps(run_one(args.rule, args.seed, args.steps)))
    elif args.command == "table":
        with open(args.json) as f:
            print(train_table(json.load(f)))
    elif args.command == "train":
        print(train_table(train_all(args)))
    else:
        report = shapes_report(args.rules)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        print(shapes_table(report))


if __name__ == "__main__":
    main()
