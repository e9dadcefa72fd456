"""PyTorch Lightning: a LightningModule whose configure_optimizers returns torch.optim.AdamW
trains with Gefen under gefen_compile.patch_adamw() and the runner, exactly as one returning
gefen_compile.Gefen does, and as a hand-written loop with Gefen does (Lightning's gradient
clipping, accumulation and precision plugins around Gefen's step); Lightning checkpoints resume
bit-identically, a Gefen checkpoint is refused by a plain AdamW run with the fix in the message,
and an AdamW checkpoint is migrated; a LightningModule compiled with backend="gefen" never
allocates AdamW's state, stepped by manual or automatic optimization (whose first forward runs
inside the step's closure). CPU only, tiny models, a few steps."""

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

L = pytest.importorskip("lightning")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import gefen_compile  # noqa: E402
from gefen_compile import Gefen  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GEFEN_STATE = ["codes", "magnitude", "period", "step", "vmean"]
V, T, D = 16, 8, 16  # vocabulary, context, width
BATCHES = 4  # per epoch


class TinyGPT(nn.Module):
    """A one-block, nanoGPT-style transformer with a tied head."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
        self.ln1, self.ln2, self.ln = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc, self.out = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        q, k, v = (t.unflatten(-1, (2, D // 2)).transpose(1, 2)
                   for t in self.qkv(self.ln1(x)).split(D, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).flatten(2))
        x = x + self.out(F.gelu(self.fc(self.ln2(x))))
        return self.head(self.ln(x))


def loss_of(net, batch):
    x, y = batch
    return F.cross_entropy(net(x).flatten(0, 1).float(), y.flatten())


class LM(L.LightningModule):
    """``optimizer``: "adamw" (torch.optim.AdamW, looked up at configure time) or "gefen";
    ``schedule``: return the optimizer in a dict with a per-step StepLR."""

    def __init__(self, optimizer="adamw", schedule=False):
        super().__init__()
        torch.manual_seed(0)
        self.net, self.optimizer, self.schedule, self.losses = TinyGPT(), optimizer, schedule, []

    def training_step(self, batch, batch_idx):
        loss = loss_of(self.net, batch)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        cls = torch.optim.AdamW if self.optimizer == "adamw" else Gefen
        opt = cls(self.parameters(), lr=1e-2, weight_decay=0.1)
        if not self.schedule:
            return opt
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ManualTwoOptimizers(LM):
    """Manual optimization, two optimizers stepped alternately (GAN style)."""

    def __init__(self, optimizer="adamw"):
        super().__init__(optimizer)
        self.automatic_optimization = False

    def configure_optimizers(self):
        cls = torch.optim.AdamW if self.optimizer == "adamw" else Gefen
        first = [p for n, p in self.named_parameters() if n.startswith("net.w")]
        rest = [p for n, p in self.named_parameters() if not n.startswith("net.w")]
        return [cls(first, lr=1e-2), cls(rest, lr=1e-2)]

    def training_step(self, batch, batch_idx):
        for opt in self.optimizers():
            loss = loss_of(self.net, batch)
            opt.zero_grad()
            self.manual_backward(loss)
            self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
            opt.step()
        self.losses.append(loss.item())


def loader():
    """The same batches every epoch, in the same order: next token = token + 1."""
    gen = torch.Generator().manual_seed(0)
    seq = (torch.randint(0, V, (8 * BATCHES, 1), generator=gen) + torch.arange(T + 1)) % V
    return DataLoader(TensorDataset(seq[:, :-1], seq[:, 1:]), batch_size=8, shuffle=False)


def fit(module, epochs=2, ckpt_path=None, checkpoint_dir=None, **options):
    callbacks = [] if checkpoint_dir is None else [L.pytorch.callbacks.ModelCheckpoint(
        dirpath=checkpoint_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(callbacks),
                        callbacks=callbacks, max_epochs=epochs, **options)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def state_keys(opt):
    return sorted({k for s in opt.state.values() for k in s})


@pytest.fixture
def patched():
    with gefen_compile.patched_adamw():
        yield


@pytest.mark.parametrize("schedule", [False, True], ids=["optimizer", "with_scheduler_dict"])
def test_patched_adamw_from_configure_optimizers_is_gefen(schedule, adamw_state_allocations):
    reference = LM("gefen", schedule)
    fit(reference)
    module = LM("adamw", schedule)
    with gefen_compile.patched_adamw():
        trainer = fit(module)
    opt = trainer.optimizers[0]
    assert isinstance(opt, Gefen) and isinstance(opt, torch.optim.AdamW)
    assert state_keys(opt) == GEFEN_STATE and not adamw_state_allocations
    assert gefen_compile.memory_report(opt).gefen_bytes_per_param < 4  # AdamW's: 8
    # The same trajectory as Gefen built directly, and it learns.
    assert module.losses == reference.losses
    assert all(map(torch.equal, params(module), params(reference)))
    assert module.losses[-1] < 0.7 * module.losses[0]
    assert {float(s["step"]) for s in opt.state.values()} == {2.0 * BATCHES}
    if schedule:  # the scheduler drove Gefen's lr: 8 steps at step_size 3 halve it twice
        assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)


@pytest.mark.parametrize("options", [
    {"gradient_clip_val": 0.5},
    {"gradient_clip_val": 0.01, "gradient_clip_algorithm": "value"},
    {"accumulate_grad_batches": 2},
], ids=["clip_norm", "clip_value", "accumulate"])
def test_lightning_loop_steps_gefen_as_a_plain_loop_does(options, patched):
    """Lightning's closure, clipping and accumulation around a converted AdamW: bit for bit a
    hand-written loop with Gefen."""
    module = LM("adamw")
    trainer = fit(module, epochs=1, **options)
    assert isinstance(trainer.optimizers[0], Gefen)

    plain = LM("gefen")
    opt = Gefen(plain.parameters(), lr=1e-2, weight_decay=0.1)
    accumulate = options.get("accumulate_grad_batches", 1)
    losses = []
    for i, batch in enumerate(loader()):
        loss = loss_of(plain.net, batch)
        losses.append(loss.item())
        (loss / accumulate).backward()
        if (i + 1) % accumulate:
            continue
        if options.get("gradient_clip_algorithm") == "value":
            torch.nn.utils.clip_grad_value_(plain.parameters(), options["gradient_clip_val"])
        elif "gradient_clip_val" in options:
            torch.nn.utils.clip_grad_norm_(plain.parameters(), options["gradient_clip_val"])
        opt.step()
        opt.zero_grad()
    assert module.losses == losses
    assert all(map(torch.equal, params(module), params(plain)))


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precisions(precision, adamw_state_allocations):
    reference = LM("gefen")
    fit(reference, precision=precision)
    module = LM("adamw")
    with gefen_compile.patched_adamw():
        opt = fit(module, precision=precision).optimizers[0]
    assert isinstance(opt, Gefen) and not adamw_state_allocations
    assert module.losses == reference.losses
    assert all(map(torch.equal, params(module), params(reference)))
    assert module.losses[-1] < 0.7 * module.losses[0]
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    for p, s in opt.state.items():
        assert p.dtype == dtype
        assert s["codes"].dtype == torch.uint8
        assert s["magnitude"].dtype == s["vmean"].dtype == dtype


def test_manual_optimization_with_two_patched_optimizers(patched):
    module = ManualTwoOptimizers("adamw")
    trainer = fit(module)
    reference = ManualTwoOptimizers("gefen")
    fit(reference)
    assert len(trainer.optimizers) == 2 and trainer.global_step == 2 * 2 * BATCHES
    for opt in trainer.optimizers:
        assert isinstance(opt, Gefen) and state_keys(opt) == GEFEN_STATE
        assert {float(s["step"]) for s in opt.state.values()} == {2.0 * BATCHES}
    assert module.losses == reference.losses
    assert all(map(torch.equal, params(module), params(reference)))


@pytest.mark.parametrize("optimizer", ["gefen", "patched_adamw"])
def test_checkpoint_resume_is_bit_identical(optimizer, tmp_path):
    kind = "gefen" if optimizer == "gefen" else "adamw"
    with gefen_compile.patched_adamw() if kind == "adamw" else contextlib.nullcontext():
        whole = LM(kind)
        whole_opt = fit(whole, epochs=3).optimizers[0]
        fit(LM(kind), epochs=2, checkpoint_dir=tmp_path)
        saved = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)["optimizer_states"][0]
        assert saved["codebook"].shape == (256,)
        assert all(e["codes"].dtype == torch.uint8 for e in saved["state"].values())
        resumed = LM(kind)
        trainer = fit(resumed, epochs=3, ckpt_path=tmp_path / "epoch=0.ckpt")
    opt = trainer.optimizers[0]
    assert isinstance(opt, Gefen) and trainer.global_step == 3 * BATCHES
    # Lightning's _optimizer_to_device ran over the loaded state: codes stay uint8.
    assert all(s["codes"].dtype == torch.uint8 for s in opt.state.values())
    assert resumed.losses == whole.losses[BATCHES:]
    assert all(map(torch.equal, params(resumed), params(whole)))
    assert torch.equal(opt.codebook, whole_opt.codebook)
    for p, q in zip(resumed.parameters(), whole.parameters()):
        a, b = opt.state[p], whole_opt.state[q]
        assert a["period"] == b["period"]
        for key in ("codes", "magnitude", "vmean", "step"):
            assert torch.equal(a[key], b[key]), key


def test_gefen_checkpoint_refused_by_a_plain_adamw_run(tmp_path, no_conversion_at_load):
    fit(LM("gefen"), epochs=1, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"gefen_compile\.Gefen optimizer state.*adamw_state_dict"):
        fit(LM("adamw"), epochs=2, ckpt_path=tmp_path / "epoch=0.ckpt")


def test_adamw_checkpoint_resumes_as_gefen(tmp_path, adamw_state_allocations):
    fit(LM("adamw"), epochs=1, checkpoint_dir=tmp_path)
    saved = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)["optimizer_states"][0]
    assert "exp_avg" in saved["state"][0]
    adamw_state_allocations.clear()
    module = LM("adamw")
    with gefen_compile.patched_adamw():
        trainer = fit(module, epochs=3, ckpt_path=tmp_path / "epoch=0.ckpt")
    opt = trainer.optimizers[0]
    assert isinstance(opt, Gefen) and state_keys(opt) == GEFEN_STATE
    assert not adamw_state_allocations
    assert all(s["codes"].dtype == torch.uint8 for s in opt.state.values())
    # AdamW's step counters carried over: one epoch saved, two more run.
    assert {float(s["step"]) for s in opt.state.values()} == {3.0 * BATCHES}
    assert module.losses[-1] < module.losses[0]


class Regression(L.LightningModule):
    """A small MLP. ``manual``: manual optimization, the forward before ``optimizer.step()``;
    else automatic, where Lightning runs forward and backward inside the step's closure."""

    def __init__(self, manual):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.automatic_optimization, self.losses = not manual, []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self.net(x) - y).pow(2).mean()
        self.losses.append(loss.item())
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("manual", [True, False], ids=["manual", "automatic"])
def test_compiled_module_with_gefen_backend(manual, adamw_state_allocations, caplog):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    module = Regression(manual)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, max_epochs=8)
    with caplog.at_level(logging.INFO, logger="gefen_compile"):
        trainer.fit(torch.compile(module, backend="gefen"), data)
    opt = trainer.optimizers[0]
    assert isinstance(opt, Gefen) and isinstance(opt, torch.optim.AdamW)
    assert state_keys(opt) == GEFEN_STATE and not adamw_state_allocations
    # Converted before its first step: AdamW had allocated nothing.
    assert [r.getMessage().split(": ")[1][:20] for r in caplog.records
            if "converted torch.optim.adamw.AdamW" in r.getMessage()] == ["optimizer state 0 B "]
    assert {float(s["step"]) for s in opt.state.values()} == {32.0}
    assert sum(module.losses[-4:]) < 0.5 * sum(module.losses[:4])


SCRIPT = """
import lightning as L, torch
from torch import nn

class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net, self.losses = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)), []
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self.net(x) - y).pow(2).mean()
        self.losses.append(loss.item())
        return loss
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)}

x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), 16)
module = Regression()
trainer = L.Trainer(accelerator="cpu", max_epochs=8, logger=False, enable_progress_bar=False,
                    enable_checkpointing=False, enable_model_summary=False)
trainer.fit(module, data)
opt = trainer.optimizers[0]
keys = sorted({k for s in opt.state.values() for k in s})
print(type(opt).__name__, ",".join(keys), sum(module.losses[-4:]) < 0.5 * sum(module.losses[:4]))
"""


def test_runner_runs_an_unmodified_lightning_script(tmp_path):
    (tmp_path / "train.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GEFEN_COMPILE_RUNNER", None)
    result = subprocess.run([sys.executable, "-m", "gefen_compile", "train.py"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["GefenAdamW", ",".join(GEFEN_STATE), "True"]
    assert "gefen_compile: converted torch.optim.adamw.AdamW to Gefen" in result.stderr
