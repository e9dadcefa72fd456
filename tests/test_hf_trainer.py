"""Hugging Face ``transformers.Trainer`` with Gefen, the ways its users meet it: the patch
before a Trainer that builds ``torch.optim.AdamW`` itself (``optim="adamw_torch"`` and
``"adamw_torch_fused"``), the runner around an unmodified Trainer script, Gefen passed in
explicitly, a ``create_optimizer`` override with an AdamW subclass, and checkpoints
(``save_steps`` then ``resume_from_checkpoint``, Gefen's and AdamW's both ways). Tiny GPT-2
and Llama models built from configs, on CPU, a few steps each."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          Trainer, TrainingArguments)

import gefen_compile  # noqa: E402
from gefen_compile import Gefen  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GEFEN_STATE = ["codes", "magnitude", "period", "step", "vmean"]
VOCAB, SEQ, LR = 128, 32, 3e-3

transformers.logging.set_verbosity_error()


class Tokens(torch.utils.data.Dataset):
    """64 sequences of random token ids, each an 8-token pattern repeated (learnable)."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (64, 8), generator=gen).repeat(1, SEQ // 8)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB,
                                      n_positions=64))


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=64))


def trainer(out, model, trainer_cls=Trainer, optimizers=(None, None),
            optimizer_cls_and_kwargs=None, **overrides):
    kwargs = dict(output_dir=str(out), report_to=[], use_cpu=True, max_steps=10,
                  per_device_train_batch_size=8, learning_rate=LR, weight_decay=0.1,
                  logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True)
    kwargs.update(overrides)
    return trainer_cls(model=model, args=TrainingArguments(**kwargs), train_dataset=Tokens(),
                       optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs)


def inner(tr):
    """The optimizer inside accelerate's AcceleratedOptimizer."""
    return getattr(tr.optimizer, "optimizer", tr.optimizer)


def state_keys(opt):
    return sorted({k for s in opt.state.values() for k in s})


def steps(opt):
    return {float(s["step"]) for s in opt.state.values() if s}


def losses(tr):
    return [h["loss"] for h in tr.state.log_history if "loss" in h]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared machine with few cores two
    OpenMP threads that spin-wait for each other make a step tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def patched():
    gefen_compile.patch_adamw()
    yield
    gefen_compile.unpatch_adamw()


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_patched_trainer_steps_gefen(optim, tmp_path, patched, adamw_state_allocations):
    """The patch turns the AdamW Trainer builds into Gefen, with Trainer's two param groups
    (weight decay on matrices, none on biases and LayerNorm), gradient accumulation, clipping
    and a warmup schedule: the run is bit for bit Trainer's run with gefen_compile.Gefen as its
    optimizer class, and AdamW's state is never allocated."""
    features = dict(optim=optim, gradient_accumulation_steps=2, max_grad_norm=0.5,
                    warmup_steps=3)
    tr = trainer(tmp_path / "patched", gpt2(), **features)
    tr.train()
    opt = inner(tr)
    assert isinstance(opt, Gefen) and isinstance(opt, torch.optim.AdamW)
    assert not adamw_state_allocations
    assert state_keys(opt) == GEFEN_STATE
    assert steps(opt) == {10.0}
    decayed, not_decayed = opt.param_groups
    assert (decayed["weight_decay"], not_decayed["weight_decay"]) == (0.1, 0.0)
    assert all(p.dim() == 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in not_decayed["params"])  # biases, LayerNorm
    assert bool(decayed["fused"]) == (optim == "adamw_torch_fused")
    report = gefen_compile.memory_report(tr.optimizer)  # through accelerate's wrapper
    assert report.gefen_bytes_per_param < 3 < 8 <= report.adamw_bytes_per_param
    run = losses(tr)
    assert len(run) == 10 and sum(run[-2:]) / 2 < run[0] - 0.05

    reference = trainer(tmp_path / "gefen", gpt2(), optimizer_cls_and_kwargs=(Gefen, {"lr": LR}),
                        **features)
    reference.train()
    assert type(inner(reference)) is Gefen
    assert same(tr.model, reference.model)
    assert losses(reference) == run


def test_unmodified_trainer_script_under_the_runner(tmp_path):
    """``python -m gefen_compile script.py``: a Trainer script with no mention of Gefen (a Llama,
    fused AdamW, bf16 autocast on CPU) trains with Gefen, and the runner says so."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from test_hf_trainer import inner, llama, losses, state_keys, trainer
        calls = []
        allocate = torch.optim.Adam._init_group
        def counted(self, *args, **kwargs):
            calls.append(1)
            return allocate(self, *args, **kwargs)
        torch.optim.Adam._init_group = counted
        tr = trainer(sys.argv[1], llama(), optim="adamw_torch_fused", bf16=True)
        tr.train()
        opt = inner(tr)
        json.dump({{"mro": [c.__name__ for c in type(opt).__mro__], "keys": state_keys(opt),
                   "allocations": len(calls), "losses": losses(tr)}}, open(sys.argv[2], "w"))
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "gefen_compile", str(script),
                             str(tmp_path / "out"), str(tmp_path / "run.json")],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "converted torch.optim.adamw.AdamW to Gefen" in result.stderr
    run = json.loads((tmp_path / "run.json").read_text())
    assert "Gefen" in run["mro"] and "AdamW" in run["mro"]
    assert run["keys"] == GEFEN_STATE and run["allocations"] == 0
    assert len(run["losses"]) == 10 and run["losses"][-1] < run["losses"][0] - 0.1


def test_create_optimizer_override_with_adamw_subclass(tmp_path, patched):
    """A Trainer subclass whose create_optimizer builds its own AdamW subclass (step() calls
    super().step()): converted under the patch, Gefen's update once per step."""

    class CountingAdamW(torch.optim.AdamW):
        calls = 0

        def step(self, closure=None):
            self.calls += 1
            return super().step(closure)

    class MyTrainer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = CountingAdamW(self.model.parameters(), lr=LR, weight_decay=0.1)
            return self.optimizer

    tr = trainer(tmp_path / "mine", gpt2(), trainer_cls=MyTrainer)
    tr.train()
    opt = inner(tr)
    assert isinstance(opt, CountingAdamW) and isinstance(opt, Gefen)
    assert opt.calls == 10 and steps(opt) == {10.0} and state_keys(opt) == GEFEN_STATE
    model = gpt2()
    reference = trainer(tmp_path / "gefen", model,
                        optimizers=(Gefen(model.parameters(), lr=LR, weight_decay=0.1), None))
    reference.train()
    assert same(tr.model, reference.model)


@pytest.mark.parametrize("how", ["patched", "explicit"])
def test_resume_from_checkpoint_continues_bit_for_bit(how, tmp_path, request):
    """save_steps, then a new Trainer with resume_from_checkpoint: optimizer.pt is loaded and
    the run ends exactly where the uninterrupted run (same seed, same data order) ends."""
    if how == "patched":
        request.getfixturevalue("patched")

    def build(out, **overrides):
        model = llama()
        optimizers = ((Gefen(model.named_parameters(), lr=LR, weight_decay=0.1), None)
                      if how == "explicit" else (None, None))
        return trainer(out, model, optimizers=optimizers, warmup_steps=2, **overrides)

    full = build(tmp_path, save_strategy="steps", save_steps=5)
    full.train()  # uninterrupted, checkpoints at steps 5 and 10
    assert (tmp_path / "checkpoint-5" / "optimizer.pt").is_file()
    resumed = build(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    assert isinstance(inner(resumed), Gefen)
    assert steps(inner(resumed)) == {10.0}  # 5 loaded from optimizer.pt, 5 more
    assert same(full.model, resumed.model)
    for a, b in zip(inner(full).state.values(), inner(resumed).state.values(), strict=True):
        assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["vmean"], b["vmean"])


def test_gefen_checkpoint_into_plain_adamw_trainer(tmp_path, no_conversion_at_load):
    """A plain-AdamW Trainer refuses a Gefen checkpoint with the fix in the message; the
    checkpoint converted with adamw_state_dict then resumes with AdamW."""
    with gefen_compile.patched_adamw():
        saved = trainer(tmp_path, gpt2(), max_steps=5, save_strategy="steps", save_steps=5)
        saved.train()  # the Trainer builds its optimizer here, inside the block
    assert isinstance(inner(saved), Gefen)
    checkpoint = tmp_path / "checkpoint-5"
    with pytest.raises(ValueError, match=r"gefen_compile\.adamw_state_dict"):
        trainer(tmp_path, gpt2()).train(resume_from_checkpoint=str(checkpoint))

    path = checkpoint / "optimizer.pt"
    torch.save(gefen_compile.adamw_state_dict(torch.load(path, weights_only=True)), path)
    resumed = trainer(tmp_path, gpt2())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    opt = inner(resumed)
    assert type(opt) is torch.optim.AdamW
    assert state_keys(opt) == ["exp_avg", "exp_avg_sq", "step"] and steps(opt) == {10.0}


def test_adamw_checkpoint_into_patched_trainer(tmp_path):
    """An AdamW Trainer's checkpoint resumes into a patched Trainer: the moments are migrated
    into Gefen state (AdamW's buffers gone), the step count carries on, training goes on."""
    saved = trainer(tmp_path, gpt2(), max_steps=5, save_strategy="steps", save_steps=5)
    saved.train()
    assert type(inner(saved)) is torch.optim.AdamW
    with gefen_compile.patched_adamw():
        resumed = trainer(tmp_path / "resumed", gpt2())
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    opt = inner(resumed)
    assert isinstance(opt, Gefen) and opt.codebook is not None
    assert state_keys(opt) == GEFEN_STATE and steps(opt) == {10.0}
    after = losses(resumed)[5:]  # the steps run after resuming
    assert len(after) == 5 and all(torch.isfinite(torch.tensor(after)))
    assert not same(saved.model, resumed.model)
