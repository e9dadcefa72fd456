"""Everything a GPU run of the Gefen step must establish, in one command, in under 5 minutes.

    python benchmarks/gpu_check.py            # on a CUDA machine
    python benchmarks/gpu_check.py --quick    # the checks without the step table

1. the Triton kernel compiled for this GPU gives the CPU path's codes (exactly) and parameters
   (to rounding), fp32 and bf16, several groups, tensor lr, skipped parameters;
2. steps 2-20 under torch.cuda.set_sync_debug_mode("error"): float lr, tensor lr on the device,
   tensor betas, an LR scheduler: no host synchronisation; and under torch.amp.GradScaler with
   a converted AdamW(fused=True), whose overflow steps are skipped on the device;
3. capturable=True: the step captured in a CUDA graph and replayed with lr changes equals eager
   steps;
4. a training step under torch.compile(mode="reduce-overhead") with a tensor lr that changes;
5. GefenMuon: the Triton momentum kernel gives the CPU path's codes (exactly) and parameters
   (to the Newton-Schulz products' rounding), fp32 and bf16; steps 2-20 without host sync;
6. the step table (benchmarks/bench_step.py): median step time of Gefen and fused AdamW on
   GPT-2 small and Llama 1B shapes, fp32 and bf16, with the fraction of measured copy
   bandwidth each reaches; then Muon and GefenMuon on their hidden matrices.

Each check prints PASS or FAIL with its figures; the exit code counts the failures.
"""

from __future__ import annotations

import argparse
import copy
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gefen_compile import Gefen, GefenMuon  # noqa: E402

SHAPES = [(64, 128), (128,), (37,), (8, 2048), (12, 40), (4, 768)]
FAILURES: list[str] = []


def check(name):
    def wrap(fn):
        def run(*args):
            try:
                detail = fn(*args)
                print(f"PASS {name}: {detail}", flush=True)
            except Exception as error:  # a check's failure is reported, the others still run
                FAILURES.append(name)
                print(f"FAIL {name}: {error!r}", flush=True)
                traceback.print_exc()
        return run
    return wrap


def model(device, dtype, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]


def on_cpu_and_gpu(train):
    """(dtype, CPU run, GPU run) for fp32 and bf16; ``train(device, dtype)`` returns the
    parameters and the optimizer that stepped them."""
    for dtype in (torch.float32, torch.bfloat16):
        yield dtype, train("cpu", dtype), train("cuda", dtype)


def grads_for(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for p in params:
        rows = torch.randn(p.shape[0], *[1] * (p.dim() - 1), generator=gen).exp()
        out.append((rows * torch.randn(p.shape, generator=gen)).to(p.device, p.dtype))
    return out


def groups(params, lr):
    return [{"params": params[0::2], "lr": lr},
            {"params": params[1::2], "lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.0}]


@check("kernel equals the CPU path")
def kernel_equals_cpu():
    def train(device, dtype):
        params = model(device, dtype)
        lr = torch.tensor(1e-2, dtype=torch.float64, device=device)
        opt = Gefen(groups(params, lr), weight_decay=0.1)
        for step in range(6):
            for i, (p, g) in enumerate(zip(params, grads_for(params, step))):
                p.grad = None if (i + step) % 5 == 0 and step else g
            opt.step()
        return params, opt

    worst = {}
    for dtype, (cpu, cpu_opt), (gpu, gpu_opt) in on_cpu_and_gpu(train):
        for a, b in zip(cpu, gpu):
            assert torch.equal(cpu_opt.state[a]["codes"], gpu_opt.state[b]["codes"].cpu())
            torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-5, atol=1e-6)
        worst[str(dtype)] = max((a.detach() - b.detach().cpu()).abs().max().item()
                                for a, b in zip(cpu, gpu))
    return f"codes identical; largest parameter difference {worst}"


@check("no host sync on steps 2-20")
def no_sync():
    for name, make in (
        ("float lr", lambda p: Gefen(p, lr=1e-3)),
        ("tensor lr", lambda p: Gefen(p, lr=torch.tensor(1e-3, device="cuda"))),
        ("tensor betas", lambda p: Gefen(p, lr=torch.tensor(1e-3, device="cuda"), betas=(
            torch.tensor(0.9, device="cuda"), torch.tensor(0.999, device="cuda")))),
        ("scheduler", lambda p: Gefen(p, lr=1e-3)),
    ):
        params = model("cuda", torch.float32)
        opt = make(params)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
        grads = [grads_for(params, s) for s in range(20)]
        for step in range(20):
            for p, g in zip(params, grads[step]):
                p.grad = g
            if step:  # the first step reads periods and the codebook back: allowed
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
                if name == "scheduler":
                    scheduler.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
    return "float lr, tensor lr, tensor betas, scheduler"


@check("GradScaler with a converted AdamW(fused=True): overflow skipped, no host sync")
def grad_scaler_no_sync():
    import gefen_compile

    params = model("cuda", torch.float32)
    opt = gefen_compile.convert(torch.optim.AdamW(params, lr=1e-3, fused=True))
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    grads = [grads_for(params, s) for s in range(20)]
    overflow_at = 10
    for step in range(20):
        scale = scaler.scale(torch.ones((), device="cuda"))  # the scaled loss's factor
        for p, g in zip(params, grads[step]):
            p.grad = g * scale
        if step == overflow_at:
            params[0].grad.view(-1)[0] = float("inf")
            before = [p.detach().clone() for p in params]
        if step:
            torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        if step == overflow_at:
            unchanged = all(torch.equal(a, p.detach()) for a, p in zip(before, params))
            assert unchanged, "the overflow step changed parameters"
    assert scaler.get_scale() == 2.0**15, scaler.get_scale()
    return "steps 2-20 without host sync; the overflow step changed nothing"


@check("CUDA graph capture and replay with lr changes")
def cuda_graph():
    params = model("cuda", torch.float32)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lr = torch.tensor(1e-2, device="cuda")
    opt = Gefen(params, lr=lr, capturable=True)
    twin_opt = Gefen(twin, lr=1e-2)
    static = [torch.zeros_like(p) for p in params]
    for p, t, s in zip(params, twin, static):
        p.grad, t.grad = s, s.clone()
    schedule = [1e-2, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: first step (periods, codebook) and its tables
        for step in range(3):
            for s, g in zip(static, grads_for(params, step)):
                s.copy_(g)
            for t, g in zip(twin, grads_for(params, step)):
                t.grad.copy_(g)
            opt.step()
            twin_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step, value in enumerate(schedule, start=3):
        lr.fill_(value)
        twin_opt.param_groups[0]["lr"] = value
        for s, t, g in zip(static, twin, grads_for(params, step)):
            s.copy_(g)
            t.grad.copy_(g)
        graph.replay()
        twin_opt.step()
    torch.cuda.synchronize()
    for p, t in zip(params, twin):
        assert torch.equal(opt.state[p]["codes"], twin_opt.state[t]["codes"])
        torch.testing.assert_close(p, t, rtol=1e-6, atol=1e-7)
    return f"{len(schedule)} replays equal eager steps across lr {schedule}"


@check('torch.compile(mode="reduce-overhead")')
def reduce_overhead():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8))
    net = net.cuda()
    twin = copy.deepcopy(net)
    lr = torch.tensor(1e-3, device="cuda")
    opt = Gefen(net.parameters(), lr=lr, capturable=True)
    twin_opt = Gefen(twin.parameters(), lr=1e-3)
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 8, device="cuda")

    @torch.compile(mode="reduce-overhead")
    def step_fn():
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss

    for step in range(12):
        value = 1e-3 / (1 + step)
        lr.fill_(value)
        twin_opt.param_groups[0]["lr"] = value
        loss = step_fn().item()
        twin_loss = torch.nn.functional.mse_loss(twin(x), y)
        twin_loss.backward()
        twin_opt.step()
        twin_opt.zero_grad(set_to_none=False)
        assert abs(loss - twin_loss.item()) <= 1e-4 * max(1.0, abs(loss)), (step, loss, twin_loss)
    return f"12 steps, lr changing every step, loss {loss:.4f} as eager"


MATRICES = [(64, 128), (256, 64), (96, 1024), (3, 109)]  # the last: period 1, a ragged block


@check("GefenMuon equals the CPU path, no host sync on steps 2-20")
def muon_equals_cpu():
    def train(device, dtype):
        params = model(device, dtype, shapes=MATRICES)
        opt = GefenMuon(params, lr=2e-2)
        for step in range(20):
            for p, g in zip(params, grads_for(params, step)):
                p.grad = g
            if device == "cuda" and step:
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return params, opt

    worst = {}
    for dtype, (cpu, cpu_opt), (gpu, gpu_opt) in on_cpu_and_gpu(train):
        for a, b in zip(cpu, gpu):
            assert torch.equal(cpu_opt.state[a]["codes"], gpu_opt.state[b]["codes"].cpu())
            assert torch.equal(cpu_opt.state[a]["magnitude"], gpu_opt.state[b]["magnitude"].cpu())
        worst[str(dtype)] = max(((a.detach() - b.detach().cpu()).abs().max()
                                 / a.detach().abs().max()).item() for a, b in zip(cpu, gpu))
        assert worst[str(dtype)] < 2e-2, worst
    return f"codes and magnitudes identical; largest relative parameter difference {worst}"


def step_table():
    import bench_step
    from models import MODELS

    for key, (title, kinds) in MODELS.items():
        for dtype in (torch.float32, torch.bfloat16):
            # one first step each (firsts=1): the 5-minute budget
            print(bench_step.bench(f"{title}, {dtype}", kinds(), dtype, torch.device("cuda"), 11,
                                   firsts=1), flush=True)
            matrices = [k for k in kinds() if len(k.shape) == 2
                        and not any(w in k.name for w in bench_step.NOT_FOR_MUON)]
            print(bench_step.bench(f"{title}, {dtype}, hidden matrices", matrices, dtype,
                                   torch.device("cuda"), 11, bench_step.MUON_OPTIMIZERS, "Muon",
                                   firsts=1), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the checks, no step table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA device", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} "
          f"triton {__import__('triton').__version__}", flush=True)
    kernel_equals_cpu()
    no_sync()
    grad_scaler_no_sync()
    cuda_graph()
    reduce_overhead()
    muon_equals_cpu()
    if not args.quick:
        step_table()
    print(f"{len(FAILURES)} failed: {FAILURES}" if FAILURES else "all checks passed")
    return len(FAILURES)


if __name__ == "__main__":
    sys.exit(main())
