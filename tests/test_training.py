"""End to end: Gefen trains the README's smaller example, a byte-level MLP model, as well as AdamW.

Runs ``examples/char_lm.py`` with both optimizers from the same seed (same weights, same
batches, same hyperparameters) and compares their held-out loss and optimizer-state size.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import char_lm  # noqa: E402

import gefen_compile  # noqa: E402

# Fewer than the example's default steps, to keep the test short; by then the loss has fallen
# from log(256) = 5.55 to about 1.9 nats/byte, far enough for a broken optimizer to show.
STEPS = 600
SEED = 0


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, Any]]:
    """One training run per optimizer, shared by the tests below."""
    # Every op here is small: a second OpenMP thread gains little, and on a shared runner a
    # thread waiting on a busy core makes each step many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: char_lm.train(name, STEPS, SEED) for name in ("adamw", "gefen")}
    finally:
        torch.set_num_threads(threads)


def test_both_optimizers_learn(runs: dict[str, dict[str, Any]]) -> None:
    # A model that learned nothing scores log(256) = 5.55 nats/byte.
    for name, result in runs.items():
        assert result["val_loss"] < 3.0, (name, result["val_loss"])
        assert result["train_loss"] < 3.0, (name, result["train_loss"])


def test_gefen_matches_adamw_validation_loss(runs: dict[str, dict[str, Any]]) -> None:
    adamw, gefen = runs["adamw"]["val_loss"], runs["gefen"]["val_loss"]
    assert gefen <= 1.05 * adamw, f"Gefen val loss {gefen:.4f} vs AdamW {adamw:.4f}"


def test_optimizer_state_bytes_per_param(runs: dict[str, dict[str, Any]]) -> None:
    adamw, gefen = runs["adamw"], runs["gefen"]
    assert adamw["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    assert gefen["state_bytes_per_param"] < 1.3
    # memory_report must agree with the state the optimizers actually hold.
    report = gefen_compile.memory_report(gefen["optimizer"])
    assert report.gefen_bytes_per_param == pytest.approx(gefen["state_bytes_per_param"])
    assert report.adamw_bytes_per_param == pytest.approx(adamw["state_bytes_per_param"])


def test_corpus_split_and_seeded_model() -> None:
    train, val = char_lm.load_corpus()
    assert train.dtype == val.dtype == torch.uint8
    assert len(val) / (len(train) + len(val)) == pytest.approx(0.1, abs=1e-3)
    a, b = char_lm.build_model(SEED), char_lm.build_model(SEED)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
