"""The model zoo of test_model_zoo.py: tiny models people really train, built from code or a
config (nothing downloaded), each with its batches and its loss. Also imported by
zoo_train.py, the plain training script the runner test runs in a child process."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

VOCAB, BLOCK, SEQ, BATCH = 64, 32, 16, 2
LR, WEIGHT_DECAY, STEPS = 1e-3, 0.1, 3


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_positions=BLOCK, n_embd=32, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=BLOCK))


def bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=BLOCK, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))


class _CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("mask", torch.tril(torch.ones(BLOCK, BLOCK)).view(1, 1, BLOCK, BLOCK))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for y in self.c_attn(x).split(c, dim=2))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
        att = att.masked_fill(self.mask[:, :, :t, :t] == 0, float("-inf")).softmax(dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(b, t, c))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), _CausalSelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's model, small: a causal mask and positions sliced to the sequence length, the
    head tied to the token embedding."""

    def __init__(self, dim: int = 32, heads: int = 2, layers: int = 1):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, dim), nn.Embedding(BLOCK, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.ln_f, self.lm_head = nn.LayerNorm(dim), nn.Linear(dim, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight
        self.register_buffer("pos", torch.arange(BLOCK))

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(self.pos[: idx.shape[1]])
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return nn.functional.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def resnet() -> nn.Module:
    """A ResNet-style CNN: BatchNorm (running statistics written in the forward)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        _Residual(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


class TiedEmbeddings(nn.Module):
    """One embedding matrix read twice: as the input table and as the output projection."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, dim))

    def forward(self, idx, targets):
        logits = self.mlp(self.embed(idx)) @ self.embed.weight.T
        return nn.functional.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


class Unreached(nn.Module):
    """A parameter no loss reaches (its gradient stays None): optimizers skip it."""

    def __init__(self):
        super().__init__()
        self.used = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 4))
        self.unused = nn.Linear(24, 24)

    def forward(self, x):
        return self.used(x).square().mean()


def _images(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH * 2, 3, 8, 8, generator=g), torch.randint(0, 10, (BATCH * 2,), generator=g)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple], Callable]] = {
    # name: (build, batch of a seed (a tuple of tensors), loss of (model, *batch))
    "gpt2": (gpt2, lambda s: (_tokens(s),), _lm_loss),
    "llama": (llama, lambda s: (_tokens(s),), _lm_loss),
    "bert": (bert, lambda s: (_tokens(s),), _lm_loss),
    "nanogpt": (NanoGPT, lambda s: (_tokens(s), _tokens(s + 100)), lambda m, x, y: m(x, y)),
    "resnet": (resnet, _images,
               lambda m, x, y: nn.functional.cross_entropy(m(x), y)),
    "tied": (TiedEmbeddings, lambda s: (_tokens(s), _tokens(s + 100)), lambda m, x, y: m(x, y)),
    "unreached": (Unreached, lambda s: (torch.randn(8, 24, generator=torch.Generator().manual_seed(s)),),
                  lambda m, x: m(x)),
}


def build(name: str) -> nn.Module:
    """Model ``name``, with the same initial weights on every call."""
    torch.manual_seed(0)
    return MODELS[name][0]()


def train(name: str, step) -> list[float]:
    """``STEPS`` steps of ``step(batch)`` (zero_grad, loss, backward, optimizer step), the
    losses."""
    return [float(step(MODELS[name][1](seed))) for seed in range(STEPS)]


def eager_step(name: str, forward, opt: torch.optim.Optimizer):
    """The usual training step over ``forward`` (a model, or the model compiled)."""
    loss_of = MODELS[name][2]

    def step(batch):
        opt.zero_grad()
        loss = loss_of(forward, *batch)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state: per-parameter tensors and Gefen's codebook."""
    codebook = getattr(opt, "codebook", None)
    return sum(t.nbytes for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor)) + (0 if codebook is None else codebook.nbytes)
