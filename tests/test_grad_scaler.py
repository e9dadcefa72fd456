"""torch.amp.GradScaler with a converted ``AdamW(fused=True)``: such an optimizer tells the
scaler that it unscales and skips steps itself (as Hugging Face Trainer's default optimizer,
fused AdamW, does), so Gefen's step must: steps equal to unscaled ones, overflow steps skipped."""

import pytest
import torch
from torch import nn

import gefen_compile
from gefen_compile import Gefen

SCALE = 2.0**16  # a power of two: unscaling is exact, so the two runs must agree bit for bit


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    # Stored column-major, so the kernels step a contiguous copy of it, written back: the copy
    # must come back unchanged from an overflow step.
    net[2].weight.data = net[2].weight.data.t().contiguous().t()
    return net


def loss_of(net: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    return net(torch.randn(8, 16, generator=gen)).pow(2).mean()


def overflow(net: nn.Module) -> None:
    next(net.parameters()).grad.view(-1)[0] = float("inf")


@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("built", ["converted", "patched"])
def test_grad_scaler_with_converted_fused_adamw(built, unscale_first):
    scaled, plain = model(0), model(0)
    if built == "converted":
        opt = gefen_compile.convert(torch.optim.AdamW(scaled.parameters(), lr=1e-2, fused=True))
    else:
        with gefen_compile.patched_adamw():
            opt = torch.optim.AdamW(scaled.parameters(), lr=1e-2, fused=True)
    assert opt._step_supports_amp_scaling  # what makes the scaler leave the work to the step
    reference = Gefen(plain.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    for step in range(6):
        opt.zero_grad()
        scaler.scale(loss_of(scaled, step)).backward()
        skipped = step in (0, 3)  # an overflow at the first step (learning) and a later one
        if skipped:
            overflow(scaled)
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        if not skipped:
            reference.zero_grad()
            loss_of(plain, step).backward()
            reference.step()
        for a, b in zip(scaled.parameters(), plain.parameters()):
            assert torch.equal(a, b), f"step {step}"
            if opt.state[a]:
                assert torch.equal(opt.state[a]["vmean"], reference.state[b]["vmean"])
    assert scaler.get_scale() == SCALE / 4  # both overflows seen
