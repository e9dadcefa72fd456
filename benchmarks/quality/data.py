"""The suite's data: BPE tokens of the examples' corpus, the digits split, the MLP problems.

Everything here is deterministic and independent of the optimizer, so the three optimizers of
a seed see identical data. The BPE tokenizer is trained once and cached on disk, because the
two BPE language-model workloads and every later run share it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import train_gpt  # noqa: E402  (examples/, put on the path above)

BPE_VOCAB = 8192
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gefen-compile" / "quality"
# The digits hold-out split is fixed whatever the seed: seeds change weights and batch order,
# never which images are scored.
DIGITS_SPLIT_SEED = 1234
DIGITS_VAL_FRACTION = 0.2


# ---------------------------------------------------------------------------------------------
# BPE tokens of the stdlib corpus


@dataclass(frozen=True)
class Tokens:
    """Token ids (int32) of the train and validation text, and the tokenizer's vocabulary."""

    train: Tensor
    val: Tensor
    vocab_size: int


def _train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2's pre-tokenisation: every byte is in-vocabulary)
    trained on ``text``, one line per training example."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def bpe_tokens(vocab_size: int = BPE_VOCAB, cache: Path = CACHE) -> Tokens:
    """``train_gpt.load_corpus()``'s split, BPE-encoded; the tokenizer is trained on the train
    part only, so validation text is unseen by it too.

    Cached under ``cache`` by a hash of the corpus and the vocabulary size (and the tokenizers
    version, whose training could change), so a later run skips training and encoding.
    """
    import tokenizers

    train_bytes, val_bytes = (bytes(part.numpy()) for part in train_gpt.load_corpus())
    key = hashlib.sha256(train_bytes + b"\0" + val_bytes).hexdigest()[:16]
    folder = cache / f"bpe{vocab_size}-{key}-tokenizers{tokenizers.__version__}"
    ids_path = folder / "ids.pt"
    if ids_path.is_file():
        ids = torch.load(ids_path)
        return Tokens(ids["train"], ids["val"], ids["vocab_size"])
    # A file's 90/10 split can cut a multi-byte character: "replace" turns that byte or two
    # into U+FFFD instead of failing.
    train_text, val_text = (b.decode("utf-8", errors="replace") for b in (train_bytes, val_bytes))
    tokenizer = _train_tokenizer(train_text, vocab_size)

    def encode(text: str) -> Tensor:
        return torch.tensor(tokenizer.encode(text).ids, dtype=torch.int32)

    tokens = Tokens(encode(train_text), encode(val_text), tokenizer.get_vocab_size())
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "corpus.json").write_text(json.dumps({
        "files": list(train_gpt.STDLIB_FILES), "train_bytes": len(train_bytes),
        "val_bytes": len(val_bytes), "train_tokens": len(tokens.train),
        "val_tokens": len(tokens.val)}, indent=2))
    torch.save({"train": tokens.train, "val": tokens.val, "vocab_size": tokens.vocab_size},
               ids_path)
    return tokens


# ---------------------------------------------------------------------------------------------
# scikit-learn's digits


@dataclass(frozen=True)
class Digits:
    """8x8 digit images, standardised with the training split's statistics, as
    ``(N, 1, 8, 8)`` float32, and their labels."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor


def digits() -> Digits:
    """``sklearn.datasets.load_digits`` (bundled with scikit-learn: no download), with a fixed
    20% held out for validation."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_val = int(len(y) * DIGITS_VAL_FRACTION)
    val, train = order[:n_val], order[n_val:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return Digits(x[train], y[train], x[val], y[val])


# ---------------------------------------------------------------------------------------------
# The small-MLP regression problems


def random_regression(samples: int, inputs: int, outputs: int, seed: int) -> tuple[Tensor, Tensor]:
    """Standard-normal inputs and targets from ``seed``: a problem with nothing to learn but
    memorisation, where the optimizer alone decides how far the loss falls."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, inputs, generator=generator)
    y = torch.randn(samples, outputs, generator=generator)
    return x, y
