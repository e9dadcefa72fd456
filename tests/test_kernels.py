"""The bucket kernels (C on CPU; plain torch, the CPU path without the C library; Triton, in its
interpreter without a GPU) against the core implementation (kernels/torch_step.py, itself checked
against the slow reference)."""

import contextlib
import ctypes
import ctypes.util
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import pytest
import torch

from gefen_compile import Gefen, first_step, memory_report, ops, optim
from gefen_compile.codebook import NearestCode
from gefen_compile.kernels import (cpu_step, momentum, native, prepared, tensor_shim, torch_step,
                                   triton_step)
from gefen_compile.partition import (candidate_periods, period_scores, scored_candidates,
                                     select_period)
from gefen_compile.state import compute_dtype

# Odd shapes: primes, period 1 (ragged under the robust variant: (300,), (1000,)), periods
# above 1024, 3-D tensors, an element.
SHAPES = [(24, 40), (24,), (37,), (4, 6, 10), (300,), (8, 2048), (1,), (5, 12), (1000,)]
KERNELS = {"cpu": cpu_step.step, "torch": torch_step.step, "triton": triton_step.step}
GROUPS = [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, maximize=True),
    dict(lr=torch.tensor(5e-2), betas=(0.5, 0.9), eps=1e-4, weight_decay=1.0),
]
PARAM_TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-7),
    torch.float64: dict(rtol=1e-13, atol=1e-15),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


def structured(shape, gen, dtype):
    rows = torch.exp(torch.randn(shape[0], *[1] * (len(shape) - 1), generator=gen))
    return (rows * torch.randn(shape, generator=gen)).to(dtype)


def twin_optimizers(dtype, seed=0, variant="robust"):
    """Two identical optimizers over identical parameters, in three groups, first step taken."""
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    twins = []
    for _ in range(2):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        groups = [{"params": params[i::3], **hyper} for i, hyper in enumerate(GROUPS)]
        twins.append((params, Gefen(groups, variant=variant)))
    grads = [structured(s, gen, dtype) for s in SHAPES]
    for params, opt in twins:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return twins, gen


@torch.no_grad()
def core_step(opt):
    """One step through the plain-torch core implementation, parameter by parameter."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                tables = opt._nearest.tables(p.device, compute_dtype(p.grad.dtype))
                torch_step.gefen_update(
                    p, p.grad, opt.state[p], tables.codebook, opt._nearest, opt.variant,
                    lr=group["lr"],
                    beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                    weight_decay=group["weight_decay"], maximize=group["maximize"],
                )


@torch.no_grad()
def kernel_step(opt, kernel):
    for bucket in opt._buckets:
        kernel(*opt._kernel_args(bucket, [p.grad for p in bucket.params]))


def test_cpu_steps_build_no_cuda_work_plan():
    """The CPU kernels never read the CUDA kernel's work plan, so CPU steps do not build it
    (5-10 ms of a first step on GPT-2 shapes); the Triton launcher, run on CPU tensors here,
    builds its own."""
    (_, (params, opt)), _ = twin_optimizers(torch.float32)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert all(bucket._work is None for bucket in opt._buckets)
    kernel_step(opt, triton_step.step)  # as test_kernel_equals_core checks its results
    assert all(bucket._work is None for bucket in opt._buckets)


@pytest.mark.parametrize(("variant", "bad"), [("robust", None), ("published", None),
                                              ("robust", float("nan")), ("robust", float("inf"))])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_kernel_equals_core(kernel, dtype, variant, bad):
    """``bad``: one gradient element at the second step (NaN or inf) leaves the same state in
    every kernel (its block's peak ignores a NaN element; an inf one is the peak)."""
    ((core_params, core), (params, fused)), gen = twin_optimizers(dtype, variant=variant)
    steps = 3
    for t in range(steps):
        grads = [structured(s, gen, dtype) for s in SHAPES]
        if bad is not None and t == 1:
            grads[1].view(-1)[5] = bad
        # Some parameters sit some steps out: their state must not move.
        skip = {t % len(SHAPES), (t + 3) % len(SHAPES)}
        for i, (a, b, g) in enumerate(zip(core_params, params, grads)):
            a.grad = None if i in skip else g.clone()
            b.grad = None if i in skip else g.clone()
        core_step(core)
        kernel_step(fused, KERNELS[kernel])
    for a, b in zip(core_params, params):
        sa, sb = core.state[a], fused.state[b]
        assert sa["step"].item() == sb["step"].item()
        # Every decision is exact in both (IEEE division, no fused multiply-add, exact midpoint
        # tests), so even values on a decision boundary get the same code: no tolerance here.
        assert torch.equal(sa["codes"], sb["codes"])
        # The torch bucket step is the core itself, run through views of the bucket: bit for
        # bit. The others sum each row's squares in their own order.
        tol = dict(rtol=0, atol=0) if kernel == "torch" else PARAM_TOL[dtype]
        torch.testing.assert_close(sb["magnitude"], sa["magnitude"], equal_nan=True, **tol)
        torch.testing.assert_close(sb["vmean"], sa["vmean"], equal_nan=True, **tol)
        torch.testing.assert_close(b.detach(), a.detach(), equal_nan=True, **tol)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_set_skip_flag_changes_nothing_and_a_clear_one_steps(kernel):
    """``skip``: GradScaler's found_inf, which the Triton kernel reads on the device (no host
    sync); every kernel honours it."""
    ((params, with_flag), (twins, without)), gen = twin_optimizers(torch.float32)
    grads = [structured(s, gen, torch.float32) for s in SHAPES]
    for a, b, g in zip(params, twins, grads):
        a.grad, b.grad = g.clone(), g.clone()

    def everything():
        return [t.clone() for p in params for t in (p.detach(), *with_flag.state[p].values())
                if isinstance(t, torch.Tensor)]

    @torch.no_grad()
    def step(opt, skip):
        for bucket in opt._buckets:
            KERNELS[kernel](*opt._kernel_args(bucket, [p.grad for p in bucket.params], skip))

    before = everything()
    step(with_flag, torch.ones(1))
    assert all(map(torch.equal, everything(), before))
    step(with_flag, torch.zeros(1))
    step(without, None)
    assert not all(map(torch.equal, everything(), before))
    for a, b in zip(params, twins):
        assert torch.equal(a, b)
        for key, value in with_flag.state[a].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, without.state[b][key]), key


class CountingKernel:
    """Stands in for the Triton kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_every_row_of_many_parameters_is_stepped_once():
    """The C step hands rows to its threads in chunks of whole rows across parameters (about
    16K elements each): with hundreds of parameters of mixed periods, empty ones, ones sitting
    a step out and ones larger than a chunk, each on every path and at 1 and 3 threads, every
    row is stepped exactly once (the plain-torch core gives the same codes and parameters)."""
    if native.library is None:
        pytest.skip("the C kernels are not built")
    gen = torch.Generator().manual_seed(5)
    shapes = [(3 + i % 5, 64) if i % 7 else (40 + i,) for i in range(300)]
    shapes[10:10] = [(0,), (96, 700), (0, 64), (50000,)]
    threads, previous = torch.get_num_threads(), native.cpu_path()
    try:
        for path in native.cpu_paths():
            native.use_cpu_path(path)
            for count in (1, 3):
                torch.set_num_threads(count)
                values = [torch.randn(s, generator=gen) for s in shapes]
                twins = []
                for _ in range(2):
                    params = [torch.nn.Parameter(v.clone()) for v in values]
                    twins.append((params, Gefen(params, weight_decay=0.1)))
                for step in range(3):
                    grads = [structured(s, gen, torch.float32) if s[0] else torch.zeros(s)
                             for s in shapes]
                    for i, g in enumerate(grads):
                        sits_out = step and (i % 11 == step or not g.numel())
                        for params, _ in twins:
                            params[i].grad = None if sits_out else g.clone()
                    (core_params, core), (params, opt) = twins
                    core_step(core) if step else core.step()
                    opt.step()
                for a, b in zip(core_params, params):
                    if a.numel():
                        assert torch.equal(core.state[a]["codes"], opt.state[b]["codes"])
                    torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)
    finally:
        torch.set_num_threads(threads)
        native.use_cpu_path(previous)


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16)])
def test_launches_do_not_grow_with_the_number_of_parameters(monkeypatch, dtypes):
    """One launch per row-length class present, per dtype: 8 parameters or 64 of the same
    shapes take the same launches."""
    counts = []
    for copies in (1, 8):
        counter = CountingKernel(triton_step._gefen_step_kernel)
        monkeypatch.setattr(triton_step, "_gefen_step_kernel", counter)
        shapes = [(4, 16), (64,), (8, 40), (3, 7)] * 2 * copies
        params = [torch.nn.Parameter(torch.randn(s, dtype=dtypes[i % len(dtypes)]))
                  for i, s in enumerate(shapes)]
        opt = Gefen([{"params": params[::2]}, {"params": params[1::2], "lr": 0.1}])
        for p in params:
            p.grad = torch.ones_like(p)  # period 1 everywhere: the same classes each time
        opt.step()
        kernel_step(opt, triton_step.step)
        counts.append(counter.launches)
    # Magnitude blocks of 64, 160 and 21 elements: three classes, two per dtype when split.
    assert counts[0] == counts[1] == {1: 3, 2: 4}[len(dtypes)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_into_the_state_dtype_is_torchs(dtype):
    """The kernel's rounding into bf16/fp16 equals torch's round-to-nearest-even, bit for bit:
    ties both ways, overflow to inf, subnormals, and NaN, also the GPU's NaN 0x7FFFFFFF, whose
    low bits would carry into -0.0 if rounded like a number."""
    import triton
    import triton.language as tl

    @triton.jit
    def round_kernel(x_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(out_ptr + offs, triton_step._to_state(x, DTYPE), mask=offs < n)

    bits = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F7FFFFF, 0x7F7FFFFF, 0x477FF000, 0x00012345,
            0x80000001, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001]
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32),
                   torch.randn(50, generator=gen)
                   * 10.0 ** torch.randint(-8, 8, (50,), generator=gen)])
    out = torch.empty(len(x), dtype=dtype)
    round_kernel[(1,)](x, out, len(x), DTYPE=triton_step._TRITON_DTYPES[dtype], BLOCK=128)
    expected = x.to(dtype)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    assert torch.equal(out[finite].view(torch.int16), expected[finite].view(torch.int16))


def test_strided_parameters_and_gradients_follow_the_logical_order():
    """A channels_last weight (stored in another order), a transposed one and a transposed
    gradient step bit for bit as their contiguous twins (Gefen's blocks are over the flattened
    logical order): the kernels step contiguous copies of such parameters and write them back,
    through the general path at first, then through the prepared step, which knows them."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 6, 3, 3, generator=gen)
    matrix = torch.randn(12, 20, generator=gen)
    twins = []
    for strided in (False, True):
        w = torch.nn.Parameter(weight.clone())
        m = torch.nn.Parameter(matrix.clone())
        t = torch.nn.Parameter(matrix.clone())
        if strided:
            w.data = w.data.contiguous(memory_format=torch.channels_last)
            t.data = t.data.T.contiguous().T
        twins.append(((w, m, t), Gefen([w, m, t], lr=1e-2), strided))
    for step in range(5):
        gw = structured((8, 6, 3, 3), gen, torch.float32)
        gm = structured((12, 20), gen, torch.float32)
        for (w, m, t), opt, strided in twins:
            w.grad = gw.contiguous(memory_format=torch.channels_last) if strided else gw.clone()
            m.grad = gm.T.contiguous().T if strided and step == 0 else gm.clone()
            t.grad = None if step == 3 else gm.T.contiguous().T if strided else gm.clone()
            opt.step()
            if strided and step >= 1:
                assert opt._buckets[0].copied == (0, 2)
                assert prepared.prepare(opt._buckets[0]) is not None
    ((w0, m0, t0), opt0, _), ((w1, m1, t1), opt1, _) = twins
    assert not w1.is_contiguous() and not t1.is_contiguous()
    for a, b in ((w0, w1), (m0, m1), (t0, t1)):
        assert torch.equal(opt0.state[a]["codes"], opt1.state[b]["codes"])
        assert torch.equal(b.detach(), a.detach())
    # a gradient the copies cannot stand for is the general path's to name
    w1.grad = gw.to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients .parameter 0 of param group 0"):
        opt1.step()


def test_parameters_stored_apart_stay_on_the_prepared_step_without_a_gradient(monkeypatch):
    """The general path records every parameter the kernels step through a copy, with a
    gradient this step or not: two channels_last weights whose gradients alternate (the second
    one's first step, with the first without a gradient, is a general-path step) stay on the
    prepared step from then on."""
    gen = torch.Generator().manual_seed(4)
    weights = [torch.nn.Parameter(torch.randn(8, 6, 3, 3, generator=gen).contiguous(
        memory_format=torch.channels_last)) for _ in range(2)]
    opt = Gefen(weights, lr=1e-2)
    general = []
    step_bucket = Gefen._step_bucket
    monkeypatch.setattr(Gefen, "_step_bucket",
                        lambda self, *args: (general.append(1), step_bucket(self, *args)))
    for step in range(8):
        weights[step % 2].grad = structured((8, 6, 3, 3), gen, torch.float32).contiguous(
            memory_format=torch.channels_last)
        weights[1 - step % 2].grad = None
        opt.step()
    assert len(general) == 2 and opt._buckets[0].copied == (0, 1)


def test_devices_without_kernels_take_the_torch_step_and_skip_overflow(monkeypatch):
    """A device the kernels do not run on (MPS, XPU: emulated here by taking the CPU out of
    theirs) takes the plain torch step, parameter by parameter: the codes of the kernels'
    step, parameters within rounding; a step the scaler skips changes nothing."""
    gen = torch.Generator().manual_seed(5)
    values = [torch.randn(s, generator=gen) for s in ((12, 40), (8, 6, 3, 3))]
    grads = [[structured(v.shape, gen, torch.float32) for v in values] for _ in range(3)]
    runs = []
    for kernels in (True, False):
        with monkeypatch.context() as m:
            calls = []
            if not kernels:
                m.setattr(prepared, "RUNNERS", {"cuda": prepared.RUNNERS["cuda"]})
                update = optim.gefen_update
                m.setattr(optim, "gefen_update", lambda *a, **k: (calls.append(1), update(*a, **k)))
            params = [torch.nn.Parameter(v.clone()) for v in values]
            opt = Gefen(params, lr=1e-2)
            for step in grads:
                for p, g in zip(params, step):
                    p.grad = g.clone()
                opt.step()
            if not kernels:
                before = [p.detach().clone() for p in params]
                (bucket,) = opt._buckets
                opt._step_bucket(bucket, [p.grad for p in params], torch.tensor(1.0))
                assert all(torch.equal(p, b) for p, b in zip(params, before))
            assert len(calls) == (0 if kernels else 2 * len(grads))
        runs.append((params, opt))
    (kernel_params, kernel_opt), (torch_params, torch_opt) = runs
    for a, b in zip(kernel_params, torch_params):
        assert torch.equal(kernel_opt.state[a]["codes"], torch_opt.state[b]["codes"])
        torch.testing.assert_close(b.detach(), a.detach(), **PARAM_TOL[torch.float32])


def _train_on_path(path, values, grads, dtype, variant="robust", groups=GROUPS):
    """Parameters and optimizer after a Gefen run over ``grads`` (None: no gradient) with CPU
    steps on ``path``; parameter i in groups[i % len(groups)]."""
    previous = native.use_cpu_path(path)
    try:
        params = [torch.nn.Parameter(v.clone()) for v in values]
        opt = Gefen([{"params": params[i::len(groups)], **hyper} for i, hyper in enumerate(groups)],
                    variant=variant)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = None if g is None else g.clone()
            opt.step()
        return params, opt, native.last_rows()
    finally:
        native.use_cpu_path(previous)


def _row_scaled_run(shapes, dtype):
    """Initial values and four steps' gradients for parameters of ``shapes``, rows of very
    different sizes (so that a shape's rows are its period); non-finite gradients in the
    third step (NaN codes are 0 on every path)."""
    gen = torch.Generator().manual_seed(3)
    values = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [[(structured(s, gen, torch.float32) * torch.randn(
        s[0], *[1] * (len(s) - 1), generator=gen).exp()).to(dtype) for s in shapes]
        for _ in range(4)]
    for value, (index, g) in zip((math.nan, math.inf, -math.inf), enumerate(grads[2])):
        g.view(-1)[index] = value
    return values, grads


# The rows each path runs per dtype: its own where it has them (the written AVX2 rows on AVX-512
# CPUs without VBMI too), else its vectoriser's.
PATH_ROWS = {
    "avx2": {torch.float32: "avx2", torch.bfloat16: "avx2"},
    "avx512": {torch.float32: "avx2", torch.bfloat16: "avx2"},
    "vbmi": {torch.float32: "vbmi", torch.bfloat16: "vbmi"},
    "vbmi_bf16": {torch.float32: "vbmi", torch.bfloat16: "vbmi_bf16"},
}
VECTORISED = {"avx2": "avx2 (vectorised)", "avx512": "avx512 (vectorised)",
              "vbmi": "avx512 (vectorised)", "vbmi_bf16": "avx512 (vectorised)"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("path", [p for p in native.CPU_PATHS if p != "portable"])
def test_every_cpu_path_gives_the_portable_bytes(monkeypatch, path, dtype):
    """Each instruction-set path of the C step (the vectoriser's rows for AVX2 and AVX-512,
    the written AVX2 rows, which AVX-512 CPUs without VBMI take too, the byte-plane rows with
    VBMI's lookups; test_a_codebook_too_fine_for_the_cell_table_takes_other_rows has those
    with AVX-512BW's) gives
    the same bytes as the portable rows: codes,
    magnitudes, second moments and parameters. Shapes cover a row longer than the kernels'
    buffer (period 8219), rows with tails past whole vectors of 8 and of 16 elements (75),
    chunk tails, period 1, maximize, NaN and infinite gradients, and a
    padded codebook (the tiny shapes alone: under 256 distinct entries); the short rows in
    batches, then (MAX_BATCHED_ROW 0) one by one."""
    if path not in native.cpu_paths():
        pytest.skip(f"this CPU does not run the {path} path")
    long_rows = (8, 8219)
    batched = cpu_step.MAX_BATCHED_ROW
    for short_row, shapes in ((batched, SHAPES + [(6, 75), long_rows]),
                              (0, SHAPES + [(6, 75)]), (batched, [(3, 4), (5,)])):
        monkeypatch.setattr(cpu_step, "MAX_BATCHED_ROW", short_row)
        values, grads = _row_scaled_run(shapes, dtype)
        params, opt, rows = _train_on_path(path, values, grads, dtype)
        twins, twin_opt, _ = _train_on_path("portable", values, grads, dtype)
        assert rows == PATH_ROWS.get(path, {}).get(dtype, VECTORISED[path])
        if long_rows in shapes:
            assert [opt.state[p]["period"] for p in params[-2:]] == [75, 8219]
        elif len(shapes) == 2:
            assert len(torch.unique(opt.codebook)) < 256
        for a, b in zip(params, twins):
            assert _bytes(a) == _bytes(b)
            for key in ("codes", "magnitude", "vmean"):
                assert _bytes(opt.state[a][key]) == _bytes(twin_opt.state[b][key])


# bf16 values whose updates each path must round back to bf16 as f32_to_bf16 (and torch)
# rounds: NaNs of both signs, quiet and signalling, with the largest payloads (rounded in fp32
# arithmetic, they carry into the sign bit); infinities; the largest finite; subnormals.
BF16_SPECIALS = [0x7fc0, 0xffc0, 0x7fff, 0xffff, 0x7f81, 0xff81, 0x7f80, 0xff80, 0x7f7f, 0xff7f,
                 0x0001, 0x8001, 0x007f, 0x807f, 0x0040]
BF16_NAN = 0x7fc0  # torch's bf16 of every NaN (c10::BFloat16's round_to_nearest_even)


@contextlib.contextmanager
def _mxcsr_bits(bits):
    """This thread's MXCSR with ``bits`` set (DAZ: 0x40), through glibc's fenv_t, whose last
    4 of 32 bytes are MXCSR on x86-64; put back after."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    saved = ctypes.create_string_buffer(32)
    assert libm.fegetenv(saved) == 0
    changed = ctypes.create_string_buffer(saved.raw, 32)
    mxcsr = int.from_bytes(saved.raw[28:], "little") | bits
    ctypes.memmove(ctypes.addressof(changed) + 28, mxcsr.to_bytes(4, "little"), 4)
    assert libm.fesetenv(changed) == 0
    try:
        yield
    finally:
        libm.fesetenv(saved)


@pytest.mark.parametrize("mxcsr", [0, 0x40], ids=["default", "denormals-are-zero"])
@pytest.mark.parametrize("variant", ["robust", "published"])
@pytest.mark.parametrize("path", [p for p in native.CPU_PATHS if p != "portable"])
def test_every_cpu_path_rounds_bf16_nans_and_subnormals_as_the_portable_path(
        monkeypatch, path, variant, mxcsr):
    """Parameters and per-element second moments stored in bf16 are rounded from fp32 on each
    path (AVX2 arithmetic; the byte-plane rows' AVX-512 arithmetic, or AVX512_BF16's
    conversion, which flushes subnormals and keeps NaN payloads, with the arithmetic for
    vectors holding those). On rows, batches of short rows and published period-1 blocks,
    parameters holding BF16_SPECIALS, a group whose updates and parameters are subnormal,
    gradients whose squares are, and NaN gradients in 1-d parameters (period-1 blocks in the
    published variant), one thread, with MXCSR as by default and with DAZ alone (subnormal
    inputs read as zeros, subnormal results kept, which classifying instructions then take for
    zeros): the portable path's bytes, NaN parameters stay torch's NaN, and subnormal
    parameters come out."""
    if path not in native.cpu_paths():
        pytest.skip(f"this CPU does not run the {path} path")
    if mxcsr and not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
        pytest.skip("MXCSR is set through glibc's x86-64 fenv_t")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # the C step on this thread
    shapes = [(8, 300), (64, 9), (40, 32), (257,), (1000,), (6, 75), (30,), (526,)]
    values, grads = _row_scaled_run(shapes, torch.bfloat16)
    groups = [*GROUPS, dict(lr=1e-37, betas=(0.9, 0.999), eps=1.0, weight_decay=0.0)]
    specials = torch.tensor(BF16_SPECIALS, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for i, value in enumerate(values):
        if i % len(groups) == len(groups) - 1:
            value.mul_(1e-38)  # subnormal and near it, as are that group's updates
        value.view(-1)[:len(specials)] = specials
    for t, step in enumerate(grads):
        for i, g in enumerate(step):
            g.view(-1)[-4:] = 3e-19  # squares, times 1 - beta2, subnormal
            # first gradients finite, as Gefen requires; none in the subnormal group
            if t and g.dim() == 1 and i % len(groups) != len(groups) - 1:
                g[20] = math.nan if t % 2 else -math.nan
    with _mxcsr_bits(mxcsr):
        params, opt, _ = _train_on_path(path, values, grads, torch.bfloat16, variant, groups)
        twins, twin_opt, _ = _train_on_path("portable", values, grads, torch.bfloat16, variant,
                                             groups)
    for a, b, value in zip(params, twins, values):
        assert _bytes(a) == _bytes(b)
        for key in ("codes", "magnitude", "vmean"):
            assert _bytes(opt.state[a][key]) == _bytes(twin_opt.state[b][key])
        bits = a.detach().view(torch.int16).view(-1).int() & 0xffff
        assert (bits[value.view(-1).isnan()] == BF16_NAN).all()
    subnormal = [(bits & 0x7f80 == 0) & (bits & 0x7f != 0) for bits in (
        p.detach().view(torch.int16).view(-1).int() & 0xffff for p in params[len(GROUPS)::len(groups)])]
    assert sum(int(s[len(specials):].sum()) for s in subnormal) > 10


@pytest.mark.parametrize("variant", ["robust", "published"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("path", native.CPU_PATHS)
def test_short_rows_in_batches_give_the_bytes_of_rows_one_by_one(monkeypatch, path, dtype, variant):
    """Whole rows up to cpu_step.MAX_BATCHED_ROW elements are stepped in batches of rows
    (cpu_step.c, "short rows"): on every path, dtype and variant the same bytes as with every row stepped
    alone, NaNs aside (both give NaN; its sign and payload follow operand orders, which
    compilers choose). Periods 9 to 64 beside a longer one; published period-1 blocks of 1, 2
    and 30 elements (second moments per element); batches cut by BATCH, by parameters and by
    the chunks of two threads; maximize; a parameter without a gradient for a step; rows whose
    magnitude is stored as 0 (zeros; below the smallest magnitude bf16 and fp16 store; NaN);
    then -0 gradients on a magnitude of 0 (magnitude +0 on every path); NaN of both signs;
    infinite gradients."""
    if path not in native.cpu_paths():
        pytest.skip(f"this CPU does not run the {path} path")
    shapes = [(300, 9), (70, 16), (45, 24), (40, 32), (24, 40), (20, 64), (257,), (526,), (30,),
              (90, 12), (12, 100), (1000,), (20, 50), (30, 20)]
    values, grads = _row_scaled_run(shapes, dtype)
    tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # the smallest subnormal
    for t, step in enumerate(grads):  # first gradients finite, as Gefen requires
        for g in step[:6]:
            g[5], g[6] = 0, tiny
            if t:
                g[7] = math.nan if t == 1 else -0.0
                g[8, ::2], g[8, 1::2] = math.nan, -math.nan
        if t:
            step[8][t % 3] = math.nan if t % 2 else -math.nan
    grads[1][3] = None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    runs, batched = [], cpu_step.MAX_BATCHED_ROW
    for short_row in (batched, 0):
        monkeypatch.setattr(cpu_step, "MAX_BATCHED_ROW", short_row)
        runs.append(_train_on_path(path, values, grads, dtype, variant)[:2])
    (params, opt), (twins, twin_opt) = runs
    periods = [opt.state[p]["period"] for p in params]
    assert periods[:2] == [9, 16] and batched == 64 < periods[10]
    if variant == "robust":  # the published periods of the next four span rows
        assert periods[2:6] == [24, 32, 40, 64]
    else:  # blocks of 1, 2 and 30 elements, second moments per element
        assert [(opt.state[p]["vmean"].numel(), opt.state[p]["magnitude"].numel())
                for p in params[6:9]] == [(257, 257), (526, 263), (30, 1)]

    def value_bytes(t):
        return _bytes(torch.where(t.isnan(), math.nan, t))

    for a, b in zip(params, twins):
        assert value_bytes(a) == value_bytes(b)
        for key in ("codes", "magnitude"):
            assert _bytes(opt.state[a][key]) == _bytes(twin_opt.state[b][key])
        assert value_bytes(opt.state[a]["vmean"]) == value_bytes(twin_opt.state[b]["vmean"])


@pytest.mark.parametrize("path", native.CPU_PATHS)
def test_c_first_gradient_facts_equal_torchs_on_every_path(path):
    """The C first-gradient facts (one pass: finiteness, non-zero, period scores from a
    running sum per 3840-element chunk in quarters, its own log series, one log per element or
    per pair) against partition.period_scores and aminmax in float64 torch: sizes that end
    inside a chunk and on its edge, periods longer than a chunk, blocks straddling chunks, odd
    periods among pairs (9x1024, 2x6000), bf16; constant gradients score exactly 0; NaN, inf, a
    float64 beyond fp32's range, zeros, empty and too-short tensors."""
    if path not in native.cpu_paths():
        pytest.skip(f"this CPU does not run the {path} path")
    gen = torch.Generator().manual_seed(5)
    scored = [structured(s, gen, torch.float32) for s in
              [(3, 4097), (4096,), (9, 1024), (24, 1031), (2, 6000), (13, 13), (8195,), (64, 96),
               (3840,), (2, 3840), (7681,), (3, 1283)]]
    # the constant ones last: with a log per element (12300, 720 elements: many odd block
    # edges), and per pair of elements (6144)
    scored += [scored[0].to(torch.bfloat16), torch.zeros(3, 4100), torch.full((720,), -3.5),
               torch.full((64, 96), 0.7)]
    flawed = [structured((16, 64), gen, dtype) for dtype in
              (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
    flawed[0][3, 7] = float("nan")
    flawed[1][15, 63] = float("-inf")
    flawed[2][0, 0] = float("nan")
    flawed[3][9, 1] = 1e300  # finite, but not as fp32
    short = [torch.zeros(0), torch.tensor(-0.0), torch.tensor([0.0, 2.5]),
             torch.tensor([float("nan"), 0.0, 1.0], dtype=torch.bfloat16), torch.zeros(5, 0)]
    grads = scored + flawed + short
    candidates = [candidate_periods(g.numel()) for g in grads]
    flat, offsets = [c for cs in candidates for c in cs], [0]
    for cs in candidates:
        offsets.append(offsets[-1] + len(cs))
    previous = native.use_cpu_path(path)
    try:
        got = cpu_step.first_gradient_facts(grads, flat, offsets)
    finally:
        native.use_cpu_path(previous)
    count = len(grads)
    finite = [bool(torch.isfinite(g.float()).all()) for g in grads]
    nonzero = [bool((g != 0).any()) for g in grads]
    assert got[:count].tolist() == [float(f) for f in finite]
    assert got[count : 2 * count].tolist() == [float(z) for z in nonzero]
    assert finite[len(scored):] == [False] * 4 + [True, True, True, False, True]
    scores = got[2 * count :]
    clean = offsets[len(scored)]
    expected = torch.cat([period_scores(g, cs) for g, cs in zip(scored, candidates)])
    torch.testing.assert_close(scores[:clean], expected, rtol=1e-9, atol=1e-12)
    assert set(scores[offsets[len(scored) - 3]:clean].tolist()) == {0.0}  # the constant ones
    assert offsets[-1] == offsets[len(scored) + len(flawed)]  # the short ones: no candidates
    in_torch = ops._first_gradient_facts_in_torch(grads, flat, offsets)  # CUDA's, and no C's
    assert torch.equal(in_torch[: 2 * count], got[: 2 * count])
    torch.testing.assert_close(in_torch[2 * count :][:clean], expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["few perturbed", "ulp noise", "rows scaled"])
def test_c_and_torch_pick_the_same_periods_on_near_constant_gradients(kind):
    """Near-constant gradients score near 0, where the C scores' summation order (four running
    sums per chunk) and log series could tip a peak that torch's serial cumsum does not."""
    gen = torch.Generator().manual_seed(len(kind))
    for _ in range(40):
        rows, cols = (int(torch.randint(lo, hi, (1,), generator=gen))
                      for lo, hi in ((4, 200), (9, 300)))
        g = torch.full((rows, cols), float(torch.randn(1, generator=gen)))
        if kind == "few perturbed":
            at = torch.randint(0, g.numel(), (int(torch.randint(1, 6, (1,), generator=gen)),),
                               generator=gen)
            g.view(-1)[at] *= 1 + 1e-3 * torch.randn(len(at), generator=gen)
        elif kind == "ulp noise":
            g *= 1 + 1e-7 * torch.randn(g.shape, generator=gen)
        else:
            g *= 1 + 1e-6 * torch.randn(rows, 1, generator=gen)
        candidates = candidate_periods(g.numel())
        scored = scored_candidates(candidates)
        flat, offsets = ops.flat_candidates([scored])
        picked = [select_period(candidates, dict(zip(scored, facts[2:].tolist())))
                  for facts in (cpu_step.first_gradient_facts([g], flat, offsets),
                                ops._first_gradient_facts_in_torch([g], flat, offsets))]
        assert picked[0] == picked[1], (rows, cols)


def _bytes(t):
    """The tensor's bytes (NaN payloads included; torch.equal calls NaN unequal to itself)."""
    return t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def test_cpu_paths_are_chosen_by_features_and_forced_by_name(caplog, monkeypatch):
    """The fastest path the CPU runs is the default; use_cpu_path forces another and refuses
    (naming the choices) one the CPU lacks; the path and rows are in memory_report and the
    debug log."""
    paths = native.cpu_paths()
    assert paths[0] == "portable" and set(paths) <= set(native.CPU_PATHS)
    assert native.cpu_path() == paths[-1]
    with pytest.raises(ValueError, match="'sse9' is no CPU path; the paths are portable, avx2, "
                                         "avx512, vbmi, vbmi_bf16, and this CPU runs portable"):
        native.use_cpu_path("sse9")
    p = torch.nn.Parameter(torch.randn(16, 32))
    opt = Gefen([p])
    p.grad = torch.randn(16, 32)
    previous = native.use_cpu_path("portable")
    monkeypatch.setattr(native, "_logged_rows", None)  # as in a new process
    try:
        with caplog.at_level(logging.DEBUG, logger="gefen_compile"):
            opt.step()
            opt.step()
        assert native.last_rows() == "portable"
        assert "CPU step: C, portable path" in str(memory_report(opt))
        logged = [r.getMessage() for r in caplog.records if "CPU step" in r.getMessage()]
        assert len(logged) == 1 and native.processor_name() in logged[0]
    finally:
        native.use_cpu_path(previous)


@pytest.mark.parametrize("value, error", [("portable", None),
                                          ("sse9", "GEFEN_COMPILE_CPU_PATH=sse9: use_cpu_path")])
def test_the_environment_picks_the_cpu_path(value, error):
    code = "from gefen_compile.kernels import native; print(native.cpu_path())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, native.PATH_VARIABLE: value}, timeout=120)
    if error:
        assert child.returncode != 0 and error in child.stderr
    else:
        assert child.returncode == 0 and child.stdout.strip() == value


def stepped_once(count: int = 3, shape: tuple[int, ...] = (6, 10)
                 ) -> tuple[list[torch.nn.Parameter], Gefen]:
    """``count`` parameters of ``shape`` with gradients, and a Gefen that stepped them once
    (skips the test where the C library, which the prepared step is, is not built)."""
    if native.library is None:
        pytest.skip("no C library")
    params = [torch.nn.Parameter(torch.randn(shape)) for _ in range(count)]
    opt = Gefen(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt


def test_steady_cpu_steps_take_the_prepared_tables_and_hand_odd_tensors_on(monkeypatch):
    """In steady state a CPU step reads gradients and fills its pointer tables in one C call
    (kernels/prepared.py), never the per-tensor Python checks; a tensor that call cannot
    vouch for (a gradient of another dtype, a non-contiguous gradient) goes to the general
    path, which raises the error naming it or converts it. The C kernel reads gradients
    without the GIL: the call holds each gradient it read, so that another thread replacing a
    .grad meanwhile frees nothing the kernel reads."""
    params, opt = stepped_once()
    status, held = prepared.fill_tables(opt._buckets[0])
    assert status == -1 and all(h is p.grad for h, p in zip(held, params))
    general = []
    original = Gefen._checked_grads
    monkeypatch.setattr(Gefen, "_checked_grads", lambda self, *a: general.append(1) or original(self, *a))
    twin = [p.detach().clone() for p in params]
    opt.step()
    assert general == [] and not all(torch.equal(p, t) for p, t in zip(params, twin))
    params[1].grad = params[1].grad.T.contiguous().T  # same values, another memory order
    opt.step()
    assert general == [1]
    if hasattr(params[2], "grad_dtype"):  # torch >= 2.10 refuses other dtypes unless told
        params[2].grad_dtype = None
    params[2].grad = params[2].grad.double()
    with pytest.raises(ValueError, match="gradient of parameter 2 of param group 0 has dtype "
                                         "torch.float64, the parameter torch.float32"):
        opt.step()


def test_steady_cuda_steps_launch_from_the_prepared_tables(monkeypatch):
    """On CUDA too, a steady step reads gradients and fills its pointer tables in the one C
    call, and the Triton launcher makes its device tables from them (no per-tensor Python
    checks): bit for bit the launcher's general path, gradients absent or present, also for a
    step that GradScaler's found-inf flag skips. Run here on CPU tensors, as the CUDA runner
    (the interpreter takes the launches)."""
    if native.library is None:
        pytest.skip("no C library")
    runs = []
    for path in ("general", "prepared"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 40), (64,), (3, 2048), (5,)]]
        opt = Gefen(params, lr=0.01, weight_decay=0.1)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # the first step: state learned on the C path
        with monkeypatch.context() as m:
            m.setitem(ops._STEP_KERNELS, "cpu", triton_step.step)
            if path == "prepared":
                m.setitem(prepared.RUNNERS, "cpu", prepared.RUNNERS["cuda"])
            else:
                m.setattr(prepared, "prepare", lambda bucket: None)
            general = []
            original = Gefen._checked_grads
            m.setattr(Gefen, "_checked_grads",
                      lambda self, *a: general.append(1) or original(self, *a))
            for t in range(3):
                for i, p in enumerate(params):
                    p.grad = None if (i + t) % 3 == 0 else torch.randn_like(p)
                opt.step()
            before = [p.detach().clone() for p in params]
            m.setattr(optim, "_unscaled_for_grad_scaler", lambda optimizer: torch.ones(1))
            opt.step()
            assert all(map(torch.equal, params, before))
        assert (general == []) == (path == "prepared")
        state = opt.state_dict()["state"]
        runs.append(([p.detach().clone() for p in params],
                     [state[i]["codes"] for i in range(len(params))]))
    for (a, codes_a), (b, codes_b) in zip(*[zip(*run) for run in runs]):
        assert torch.equal(a, b) and torch.equal(codes_a, codes_b)


class OwnParameter(torch.nn.Parameter):
    """A Parameter subclass: read through method calls, never the shim."""


def unbind_shim():
    """The C step reads tensors through method calls (tensor_shim.bind binds the shim again):
    offset 0, no words, no bump_version."""
    native._cpu.bind_shim(0, (), 0, 0, 0, *[0] * len(tensor_shim.FUNCTIONS), -1, -1, -1, -1, -1, 0)


def _tables_both_ways(bucket):
    """fill_tables's status and tables through torch's C shim and through method calls."""
    results = []
    for shim in (True, False):
        if not shim:
            unbind_shim()
        try:
            for t in bucket.host_tables():
                t.zero_()
            status, _ = prepared.fill_tables(bucket)
            results.append((status, *(t.tolist() for t in bucket.host_tables())))
        finally:
            tensor_shim.bind(native._cpu.bind_shim)
    return results


def test_the_steady_step_reads_tensors_through_torchs_c_shim_as_python_would():
    """Torch's C shim (kernels/tensor_shim.py) is bound on this torch, and for every kind of
    parameter and gradient the step meets (plain, Parameter, a subclass, views, other dtypes
    and memory orders, sparse, empty, absent) the C call fills the same tables and hands the
    same tensors on as through Python's method calls."""
    if native.library is None:
        pytest.skip("no C library")
    assert tensor_shim.codes[torch.float32] != tensor_shim.codes[torch.bfloat16]
    params = [torch.nn.Parameter(torch.randn(6, 10)), torch.randn(4, 5).requires_grad_(),
              OwnParameter(torch.randn(3, 7)), torch.nn.Parameter(torch.randn(8, 8).t())]
    opt = Gefen(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    bucket = opt._buckets[0]
    for p in params:
        if hasattr(p, "grad_dtype"):  # torch >= 2.10 refuses other dtypes unless told
            p.grad_dtype = None
    grads = {
        "plain": lambda p: torch.randn(p.shape),
        "transposed": lambda p: torch.randn(tuple(reversed(p.shape))).t(),
        "offset": lambda p: torch.randn(p.numel() + 1)[1:].view(p.shape),
        "bfloat16": lambda p: torch.randn(p.shape, dtype=torch.bfloat16),
        "sparse": lambda p: torch.randn(p.shape).to_sparse(),
        "subclass": lambda p: OwnParameter(torch.randn(p.shape)),
        "none": lambda p: None,
    }
    seen = set()
    for name, make in grads.items():
        for i, p in enumerate(params):
            for q in params:
                q.grad = torch.randn(q.shape) if q is not p else make(q)
            shimmed, called = _tables_both_ways(bucket)
            assert shimmed[0] == called[0], (name, i)  # ready, or which tensor is handed on
            if shimmed[0] == -1:
                assert shimmed == called, (name, i)
            seen.add(shimmed[0])
    assert {-1, 0, 1, 2, 3} <= seen  # ready, and each parameter handed on by some gradient
    for p in params:
        p.grad = None
    assert _tables_both_ways(bucket)[0][0] == -2


def test_the_tables_of_many_parameters_read_ahead_and_name_the_first_one_handed_on():
    """step_tables reads each gradient a few parameters ahead of its checks (and asks the caches
    for tensors further ahead): over 40 parameters, some without gradients, with one gradient
    it cannot take (transposed) at positions around those distances, it names that parameter,
    having filled the pointers of those before it that have gradients; with none, it hands on
    each parameter's own gradient; through the shim and through method calls alike. A gradient
    that cannot be read (its getter raises) raises only once the parameters before it are
    checked: an earlier one the C call cannot take is named instead."""
    params, opt = stepped_once(40, (4, 6))
    bucket = opt._buckets[0]
    for bad in [None, 0, 3, 4, 5, 17, 35, 36, 39]:
        for i, p in enumerate(params):
            p.grad = None if i % 7 == 2 else torch.randn_like(p)
        if bad is not None:
            params[bad].grad = torch.randn(6, 4).t()
        for status, param_ptrs, grad_ptrs, has_grad in _tables_both_ways(bucket):
            assert status == (-1 if bad is None else bad)
            filled = range(40 if bad is None else bad)
            assert [has_grad[i] for i in filled] == [int(i % 7 != 2) for i in filled]
            assert all(param_ptrs[i] == params[i].data_ptr() and
                       grad_ptrs[i] == params[i].grad.data_ptr() for i in filled if i % 7 != 2)
    for p in params:
        p.grad = torch.randn_like(p)
    status, held = prepared.fill_tables(bucket)
    assert status == -1 and all(h is p.grad for h, p in zip(held, params))
    del held
    names = ("grad", "dtype", "numel", "is_contiguous", "data_ptr", "is_neg", "device")
    descriptors = [torch._C.TensorBase.__dict__[name] for name in names]

    def unreadable(t):
        if t is params[7]:
            raise RuntimeError("this gradient cannot be read")
        return descriptors[0].__get__(t)

    bump = torch.autograd.graph.increment_version
    native._cpu.bind(property(unreadable), *descriptors[1:], bump)  # how the C call reads .grad
    try:
        with pytest.raises(RuntimeError, match="cannot be read"):
            prepared.fill_tables(bucket)
        params[5].grad = torch.randn(6, 4).t()
        assert prepared.fill_tables(bucket)[0] == 5
    finally:
        native._cpu.bind(*descriptors, bump)


def test_the_prepared_step_hands_on_tensors_of_another_device(monkeypatch):
    """A model moved after its first step keeps its buckets: the C call compares each tensor's
    device with its bucket's, through the shim and through method calls, and hands the first
    one on (the kernels would follow another device's pointers); the general path then names
    the parameter and the fix. A bucket told it lives on cuda:0 (no GPU here) stands in for a
    CPU model moved there, and the meta device for a model moved away."""
    params, opt = stepped_once()
    bucket = opt._buckets[0]
    assert [run[0] for run in _tables_both_ways(bucket)] == [-1, -1]
    with monkeypatch.context() as m:
        m.setattr(bucket, "codes", bucket.codes.to("meta"))  # its .device: meta
        assert [run[0] for run in _tables_both_ways(bucket)] == [0, 0]
        cuda = types.SimpleNamespace(device=torch.device("cuda", 0))
        m.setattr(bucket, "codes", cuda)
        assert [run[0] for run in _tables_both_ways(bucket)] == [0, 0]
    moved = torch.nn.Parameter(params[1].detach().to("meta"))
    torch.utils.swap_tensors(params[1], moved)  # as Module.to does for another tensor type
    params[1].grad = torch.randn(params[1].shape, device="meta")
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 is on meta, but its "
                                         r"state is on cpu.*build the optimizer again"):
        opt.step()


def test_the_tables_bump_the_version_of_each_parameter_they_vouch_for():
    """step_tables bumps the version counter of every parameter with a gradient (the step writes
    it; autograd then knows a tensor saved before the step is stale), and of no other: through
    libtorch's bump_version where the shim reads the parameter, in one increment_version call
    for a subclass and where the shim is off. A parameter handed on to the general path leaves
    the counters to it. An inference tensor, which has no counter, steps (bumping it would end
    the process through a C++ exception)."""
    params, opt = stepped_once(5)
    params.append(OwnParameter(torch.randn(6, 10)))
    opt.add_param_group({"params": [params[-1]]})
    params[-1].grad = torch.randn(6, 10)
    opt.step()
    (bucket,) = opt._buckets
    for shim in (True, False):
        if not shim:
            unbind_shim()
        try:
            for p in params:
                p.grad = None if p is params[2] else torch.randn_like(p)
            before = [p._version for p in params]
            status, _ = prepared.fill_tables(bucket)
            assert status == -1
            assert [p._version - b for p, b in zip(params, before)] == [1, 1, 0, 1, 1, 1]
            params[3].grad = torch.randn(10, 6).t()  # handed on: nothing more bumped
            before = [p._version for p in params]
            assert prepared.fill_tables(bucket)[0] == 3
            assert [p._version - b for p, b in zip(params, before)] == [1, 1, 0, 0, 0, 0]
        finally:
            tensor_shim.bind(native._cpu.bind_shim)
    with torch.inference_mode():
        frozen = torch.randn(6, 10)
    frozen.grad = torch.randn(6, 10)
    opt = Gefen([frozen])
    for _ in range(3):
        assert prepared.prepare(opt._buckets[0]) if opt._buckets else True
        opt.step()


def test_the_shim_finds_every_word_the_tables_read_ahead_on_this_torch():
    """On the torch CI installs, tensor_shim finds the TensorImpl words of storage, autograd
    meta, version counter and Python object, the autograd meta's gradient word, and a
    bump_version that bumps exactly the probe it is called on; memory that is not mapped reads
    as None, not a crash."""
    if native.library is None:
        pytest.skip("no C library")
    probes = tensor_shim._probes()
    words = tensor_shim._pointer_words(probes)
    assert min(words) >= 0 and len(set(words[:4])) == 4
    assert tensor_shim._bump(tensor_shim._library(), tensor_shim._offset(probes), words[2], probes)
    assert tensor_shim._read_words(8, 2) is None


def test_a_shim_that_answers_unlike_python_is_not_used(monkeypatch):
    """tensor_shim.bind checks every function on probes before handing the shim to the C
    step; a function that answers otherwise than Python (here: dimensions for sizes) leaves
    the step on method calls."""
    if native.library is None:
        pytest.skip("no C library")
    bound = []
    monkeypatch.setattr(tensor_shim, "FUNCTIONS", {
        "aoti_torch_get_dim" if name == "aoti_torch_get_numel" else name: kind
        for name, kind in tensor_shim.FUNCTIONS.items()})
    assert not tensor_shim.bind(lambda *args: bound.append(args))
    assert bound == []
    monkeypatch.undo()
    assert tensor_shim.bind(lambda *args: bound.append(args)) and len(bound) == 1


def test_the_negation_bit_is_found_past_a_word_of_addresses(monkeypatch):
    """tensor_shim finds the TensorImpl bit that marks a negated view among words that also
    hold addresses (of the tensor's Python object, say), which differ from object to object
    and can differ between a probe's plain and negated view in one bit by chance of
    allocation, in every probe alike (seen: the shim then went unbound in a test process,
    every step on method calls). Such a word, emulated beside the real ones (each tensor's
    address 64K apart, a negated view's one bit up from the first plain tensor of its probe
    read), is told apart: two plain views disagree on it."""
    real = tensor_shim._impl_words
    held: list[torch.Tensor] = []  # alive while the search runs: ids stay unique
    addresses: dict[int, int] = {}
    plain: list[int] = []  # this probe's plain tensors' words, in the order read

    def with_an_address(t):
        held.append(t)
        if t.is_neg():
            word = plain[0] | 8
            plain.clear()
        else:
            word = addresses.setdefault(id(t), 0x10000 * (len(addresses) + 1))
            plain.append(word)
        return [*real(t), word]

    expected = tensor_shim._negation_bit(tensor_shim._probes())
    monkeypatch.setattr(tensor_shim, "_impl_words", with_an_address)
    assert expected is not None and tensor_shim._negation_bit(tensor_shim._probes()) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path, spacing, expected", [
    ("avx2", 1e-6, "avx2 (vectorised)"), ("avx512", 1e-6, "avx512 (vectorised)"),
    ("avx2", 1e-4, "avx2 (vectorised)"), ("avx512", 1e-4, "avx512"),
    ("vbmi", 1e-6, "avx512 (vectorised)")])
def test_a_codebook_too_fine_for_the_cell_table_takes_other_rows(path, spacing, expected, dtype):
    """The written AVX2 rows need at most one codebook boundary per cell of their table (cells
    2^-9 wide, relatively); a codebook with entries closer than that (loaded, say) runs, on the
    AVX-512 path, the byte-plane rows with AVX-512BW's lookups where their cells (uniform, down
    to 2^-15 wide) part its boundaries, else the vectoriser's rows of the path; with the same
    bytes as the portable rows, on the shapes of test_every_cpu_path_gives_the_portable_bytes
    (short rows in batches, tails, a row longer than the kernels' buffer)."""
    if path not in native.cpu_paths():
        pytest.skip(f"this CPU does not run the {path} path")
    values, grads = _row_scaled_run(SHAPES + [(6, 75), (8, 8219)], dtype)
    source = Gefen([torch.nn.Parameter(v.clone()) for v in values])
    for p, g in zip(source.param_groups[0]["params"], grads[0]):
        p.grad = g.clone()
    source.step()
    saved = source.state_dict()
    codebook = saved["codebook"].clone()
    codebook[100:110] = 0.3 + spacing * torch.arange(10)  # ten boundaries within 2^-9 (or -18)
    saved["codebook"] = codebook.sort().values
    runs = []
    for run_path in (path, "portable"):
        previous = native.use_cpu_path(run_path)
        try:
            params = [torch.nn.Parameter(v.clone()) for v in values]
            opt = Gefen(params)
            opt.load_state_dict(saved)
            for step in grads[1:]:
                for p, g in zip(params, step):
                    p.grad = g.clone()
                opt.step()
            runs.append((params, opt, native.last_rows()))
        finally:
            native.use_cpu_path(previous)
    (params, opt, rows), (twins, twin_opt, _) = runs
    assert rows == expected
    for a, b in zip(params, twins):
        assert _bytes(a) == _bytes(b)
        for key in ("codes", "magnitude", "vmean"):
            assert _bytes(opt.state[a][key]) == _bytes(twin_opt.state[b][key])


def test_the_kernels_compile_without_the_x86_paths():
    """What a non-x86 machine (AArch64, with NEON at its baseline) builds: the portable rows
    alone, without warnings."""
    compiler = shutil.which("gcc")
    if compiler is None:
        pytest.skip("no gcc")
    source = Path(native.__file__).with_name("cpu_step.c")
    include = sysconfig.get_paths()["include"]
    child = subprocess.run(
        [compiler, "-fsyntax-only", "-std=gnu11", "-fopenmp", "-Wall", "-Wextra", "-Werror",
         "-DGEFEN_PORTABLE_ONLY", f"-I{include}", str(source)],
        capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr


@pytest.mark.parametrize("path", native.CPU_PATHS)
def test_a_step_call_the_kernel_refuses_changes_nothing(monkeypatch, path):
    """The C step refuses what it must (here an unknown dtype code) and allocates its scratch,
    the byte planes' tables included, before any step count moves: a refused call leaves the
    parameter and its state as they were."""
    if path not in native.cpu_paths():
        pytest.skip(f"this CPU does not run the {path} path")
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 32))
    opt = Gefen([p])
    p.grad = torch.randn(64, 32) * torch.randn(64, 1).exp()
    opt.step()
    before = p.detach().clone()
    state = {key: value.clone() for key, value in opt.state[p].items() if torch.is_tensor(value)}
    monkeypatch.setitem(cpu_step.DTYPE_CODES, torch.float32, 7)
    previous = native.use_cpu_path(path)
    try:
        with pytest.raises(MemoryError, match="gefen_step"):
            opt.step()
    finally:
        native.use_cpu_path(previous)
    assert torch.equal(p, before)
    for key, value in state.items():
        assert torch.equal(opt.state[p][key], value), key


# What a path's rows must not hold, for the CPUs that take that path lack it: the avx512 path
# is for AVX-512 CPUs without VBMI (Skylake-SP, Cascade Lake): no VBMI byte permute, nor a call
# into the VBMI rows' code, nor AVX512_BF16's conversion; the vbmi path for VBMI CPUs without
# AVX512_BF16 (Ice Lake): no such conversion; the avx2 path for CPUs without AVX-512: no 512-bit
# register or mask register; the portable rows for the x86-64 baseline: no 256- or 512-bit
# register.
BF16_CONVERSION = r"\bvcvtne2?ps2bf16\b"
FOREIGN = {
    "avx512": re.compile(rf"\b(vpermb|vpermi2b|vpermt2b|vpmultishiftqb)\b|call.*<\w*vbmi|"
                         rf"{BF16_CONVERSION}"),
    "vbmi": re.compile(BF16_CONVERSION),
    "avx2": re.compile(r"%zmm|%k[0-7]"),
    "portable": re.compile(r"%[yz]mm"),
}


def _disassembly() -> str:
    """The built C library's disassembly (skips without objdump or an x86-64 build)."""
    objdump = shutil.which("objdump")
    if objdump is None or native.library is None or "avx2" not in native.cpu_paths():
        pytest.skip("needs objdump and the C kernels built for x86-64")
    return subprocess.run([objdump, "-d", "--no-show-raw-insn", native.library._name],
                          capture_output=True, text=True, timeout=300, check=True).stdout


def test_each_paths_rows_hold_only_instructions_their_cpus_run():
    """A path's rows compiled with another level's instructions would pass every test on this
    machine and stop the process (SIGILL) on the CPUs that path is for. In the built library's
    disassembly, the rows and batches of each path hold none of FOREIGN's signs of such
    instructions (for avx512: VBMI's byte permutes, which the byte-plane rows there do
    without)."""
    listing = _disassembly()
    bodies = {match[1]: match[2] for match in re.finditer(
        r"^[0-9a-f]+ <((?:row|batch)_\w+?)(?:\.\w+)*>:\n(.*?)(?:\n\n|\Z)", listing, re.M | re.S)}
    checked = {path: [name for name in bodies if name.endswith("_" + path)] for path in FOREIGN}
    assert {"row_f32_avx512", "row_bf16_avx512", "batch_f32_avx512",
            "batch_bf16_avx512"} <= set(checked["avx512"])
    assert "row_f32_avx2" in checked["avx2"] and "row_f32_portable" in checked["portable"]
    assert {"row_bf16_vbmi", "batch_bf16_vbmi"} <= set(checked["vbmi"])
    # the patterns find what they seek
    assert FOREIGN["avx512"].search(bodies["row_f32_vbmi"])
    assert FOREIGN["vbmi"].search(bodies["row_bf16_vbmi_bf16"])
    assert FOREIGN["vbmi"].search(bodies["batch_bf16_vbmi_bf16"])
    for path, names in checked.items():
        for name in names:
            found = FOREIGN[path].search(bodies[name])
            assert found is None, f"{name} holds {found[0]!r}, which {path} CPUs lack"


def test_the_kernels_make_no_gathers():
    """Table lookups are scalar loads or byte permutes, never gather instructions: under the
    microcode against Downfall (GDS), on Intel's Skylake to Ice Lake CPUs, a gather takes
    ~23 cycles and the steps took 2-3x as long with them, and even without it (Sapphire Rapids)
    up to 1.31x (cpu_step.c, the AVX2 rows; setup.py).
    Neither the written rows nor the vectoriser's loops hold one."""
    listing = _disassembly()
    assert re.search(r"\bvmulps\b", listing)  # a vector listing, the pattern's kind
    found = re.search(r"^\s*[0-9a-f]+:\s+(v\w*gather\w*)\b", listing, re.M)
    assert found is None, f"the library holds {found[1]!r}"


def _momentum_step(path, dtype, nesterov, block, numel, finite):
    """GefenMuon's momentum rows on ``path`` (None: the plain-torch path) on one parameter:
    its codes, magnitudes and bfloat16 update."""
    gen = torch.Generator().manual_seed(block)
    codebook = torch.sort(torch.cat([torch.tensor([-1.0, 0.0, 1.0]),
                                     torch.rand(253, generator=gen) * 2 - 1]))[0]
    g = torch.randn(numel, generator=gen).to(dtype)
    g[::97] = 0.0
    if not finite:
        g[5], g[block + 7], g[-1] = math.nan, math.inf, -math.inf
    codes = torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=gen)
    magnitude = torch.rand(-(-numel // block), generator=gen).to(dtype)
    magnitude[1] = 0.0
    nearest = NearestCode(codebook)
    kwargs = dict(block=block, momentum=0.95, nesterov=nesterov)
    if path is None:
        tables = nearest.tables(g.device, compute_dtype(dtype))
        update = torch_step.momentum_update(g, codes, magnitude, codebook=tables.codebook,
                                            nearest=nearest, **kwargs)
    else:
        previous = native.use_cpu_path(path)
        try:
            update = momentum.momentum_step(g, codes, magnitude, **kwargs,
                                            tables=nearest.tables(g.device, compute_dtype(dtype)))
        finally:
            native.use_cpu_path(previous)
    return codes, magnitude, update


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("block,numel", [(64, 64 * 50), (256, 1000), (10000, 20000)])
def test_momentum_rows_equal_the_torch_path(dtype, nesterov, block, numel):
    """GefenMuon's C rows (buffered rows, rows longer than TILE, a ragged last row, an empty
    block) give the plain-torch path's bits on every CPU path; with non-finite gradients,
    every path gives the portable rows' bytes."""
    expected = _momentum_step(None, dtype, nesterov, block, numel, finite=True)
    portable = _momentum_step("portable", dtype, nesterov, block, numel, finite=False)
    for path in native.cpu_paths():
        assert [_bytes(t) for t in _momentum_step(path, dtype, nesterov, block, numel, True)] \
            == [_bytes(t) for t in expected], path
        assert [_bytes(t) for t in _momentum_step(path, dtype, nesterov, block, numel, False)] \
            == [_bytes(t) for t in portable], path


FORKED_CHILD_STEPS = """
import os, sys, time, torch
from gefen_compile import Gefen
torch.set_num_threads(2)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
opt = Gefen(model.parameters(), lr=1e-2)
def step():
    opt.zero_grad()
    model(torch.randn(16, 32)).square().mean().backward()
    opt.step()
for _ in range(3):
    step()  # the parent's OpenMP threads now exist
pid = os.fork()
if pid == 0:
    for _ in range(3):
        step()
    os._exit(0)
for _ in range(600):  # a minute at most: a hung child is killed, not left behind
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.1)
os.kill(pid, 9)
sys.exit("the forked child hung in its steps")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_child_forked_after_steps_keeps_stepping():
    """GNU OpenMP hangs a forked child at its first parallel region of several threads (the
    parent's threads are not copied): the kernels use one thread in a forked child."""
    if native.library is None:
        pytest.skip("no C library")
    child = subprocess.run([sys.executable, "-c", FORKED_CHILD_STEPS], capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0, child.stderr


@pytest.mark.parametrize("shim", [True, False])
def test_negated_views_step_as_their_values(shim):
    """A tensor with torch's negation bit (torch._neg_view; autograd keeps one that a custom
    Function's backward returns) holds -values in memory: as gradient (first step and steady
    state) or as parameter it steps as a plain tensor of the same values, read through the
    shim or through method calls: a negated parameter through a contiguous copy, bit for bit."""
    if not shim and native._cpu is not None:
        unbind_shim()
    try:
        gen = torch.Generator().manual_seed(7)
        values = torch.randn(12, 40, generator=gen)
        grads = [structured((12, 40), gen, torch.float32) for _ in range(3)]
        plain, other = torch.nn.Parameter(values.clone()), torch.nn.Parameter(values.clone())
        negated = torch.nn.Parameter(torch._neg_view(-values))
        plain_opt, other_opt = Gefen([plain], lr=1e-2), Gefen([other], lr=1e-2)
        negated_opt = Gefen([negated], lr=1e-2)
        for g in grads:
            plain.grad = g.clone()
            other.grad, negated.grad = torch._neg_view(-g), torch._neg_view(-g)
            for opt in (plain_opt, other_opt, negated_opt):
                opt.step()
            assert other.grad.is_neg() and negated.is_neg()
            assert torch.equal(other, plain) and torch.equal(negated, plain)
        assert torch.equal(negated_opt.state[negated]["codes"], plain_opt.state[plain]["codes"])
    finally:
        if native._cpu is not None:
            tensor_shim.bind(native._cpu.bind_shim)


def misaligned(values: torch.Tensor) -> torch.Tensor:
    """``values`` in memory one byte past an element boundary (torch.frombuffer at an odd
    offset), the buffer kept alive by the tensor."""
    buffer = bytearray(values.numel() * values.element_size() + 8)
    out = torch.frombuffer(buffer, dtype=values.dtype, offset=1, count=values.numel())
    return out.view(values.shape).copy_(values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_tensors_step_as_aligned_ones(dtype):
    """Data one byte off its element boundary (the kernels load whole elements: undefined
    behaviour in C, a fault on a GPU): the kernels step aligned copies, the parameters' written
    back; the first step too. Results as aligned tensors', bit for bit."""
    gen = torch.Generator().manual_seed(8)
    values = torch.randn(24, 40, generator=gen).to(dtype)
    grads = [structured((24, 40), gen, dtype) for _ in range(3)]
    plain, other = torch.nn.Parameter(values.clone()), torch.nn.Parameter(values.clone())
    shifted = torch.nn.Parameter(misaligned(values))
    assert shifted.data_ptr() % shifted.element_size() != 0
    opts = [Gefen([p], lr=1e-2) for p in (plain, other, shifted)]
    for g in grads:
        plain.grad, other.grad, shifted.grad = g.clone(), misaligned(g), misaligned(g)
        for opt in opts:
            opt.step()
        assert torch.equal(other, plain) and torch.equal(shifted, plain)
    assert torch.equal(opts[2].state[shifted]["codes"], opts[0].state[plain]["codes"])


def scaled_blocks(shape, block, gen, dtype):
    """A gradient whose scale changes every ``block`` elements (in logical order): its period."""
    n = math.prod(shape)
    scales = torch.exp(2 * torch.randn(n // block, 1, generator=gen))
    return (scales * torch.randn(n // block, block, generator=gen)).reshape(shape).to(dtype)


# (shape, period): a 3x3 kernel's period, an output channel's, and 9 in a weight of more
# elements than one chunk of the C step; then rows of four output channels (a robust period
# spans output channels only where they are at most 8 elements); a 3x3x3 kernel's period.
CHANNELS_LAST_CASES = [((40, 24, 3, 3), 9), ((24, 48, 3, 3), 432), ((96, 96, 3, 3), 9),
                       ((64, 2, 2, 2), 32), ((8, 6, 3, 3, 3), 27)]


def stored_as(shape, last):
    """The memory format of a weight of ``shape``: channels last (2-d or 3-d) or not."""
    return ({4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)] if last
            else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("own_memory", [True, False])
def test_channels_last_weights_step_in_their_own_memory(monkeypatch, dtype, threads, own_memory):
    """On the CPU the C step reads and writes channels_last weights (and their gradients) in
    their own memory, each chunk's output channels copied to logical order and back by the
    thread that steps them; the same bytes as contiguous twins on every path, for rows shorter
    than an output channel, as long, and longer, for a weight of several chunks, and for a 3-d
    convolution's weight (channels_last_3d). Where a
    weight's rows and channels do not fit (here: forced), contiguous copies: the same bytes."""
    if not own_memory:
        monkeypatch.setattr(prepared, "CHANNELS_LAST_MAX", 0)
    monkeypatch.setattr(cpu_step, "threads", lambda: threads)
    # the periods chosen (inference prefers an output channel to two of them)
    periods = {max(candidate_periods(math.prod(shape))): period
               for shape, period in CHANNELS_LAST_CASES}
    monkeypatch.setattr(first_step, "select_period", lambda c, scores: periods[c[-1]])
    gen = torch.Generator().manual_seed(6)
    values = [torch.randn(shape, generator=gen).to(dtype) for shape, _ in CHANNELS_LAST_CASES]
    grads = [[scaled_blocks(shape, period, gen, dtype) for shape, period in CHANNELS_LAST_CASES]
             for _ in range(4)]
    for path in native.cpu_paths():
        previous = native.use_cpu_path(path)
        try:
            runs = []
            for last in (False, True):
                params = [torch.nn.Parameter(v.clone(memory_format=stored_as(v.shape, last)))
                          for v in values]
                opt = Gefen(params, lr=1e-2)
                for step in grads:
                    for p, g in zip(params, step):
                        p.grad = g.clone(memory_format=stored_as(g.shape, last))
                    opt.step()
                runs.append((params, opt))
        finally:
            native.use_cpu_path(previous)
        (plain, plain_opt), (stored, stored_opt) = runs
        assert [plain_opt.state[p]["period"] for p in plain] == [c[1] for c in CHANNELS_LAST_CASES]
        ready = prepared.prepare(stored_opt._buckets[0])
        assert (ready.layout is not None and not ready.copies) == own_memory
        assert all(p.is_contiguous(memory_format=stored_as(p.shape, True)) for p in stored)
        for a, b in zip(plain, stored):
            assert torch.equal(plain_opt.state[a]["codes"], stored_opt.state[b]["codes"]), path
            assert torch.equal(a.detach(), b.detach()), path


def test_a_negated_channels_last_weight_takes_a_copy_beside_one_in_its_own_memory():
    """A channels_last weight the C step cannot read in its own memory (negated) takes a
    contiguous copy, and the bucket stays on the prepared step: the other weight is read in its
    own memory; both as their contiguous twins, bit for bit."""
    gen = torch.Generator().manual_seed(9)
    values = [torch.randn(16, 8, 3, 3, generator=gen) for _ in range(2)]
    grads = [[structured((16, 8, 3, 3), gen, torch.float32) for _ in values] for _ in range(4)]
    runs = []
    for stored in (False, True):
        if stored:
            last = [v.contiguous(memory_format=torch.channels_last) for v in values]
            params = [torch.nn.Parameter(torch._neg_view(-last[0])), torch.nn.Parameter(last[1])]
        else:
            params = [torch.nn.Parameter(v.clone()) for v in values]
        opt = Gefen(params, lr=1e-2)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.contiguous(memory_format=torch.channels_last) if stored else g.clone()
            opt.step()
        runs.append((params, opt))
    (plain, plain_opt), (stored, stored_opt) = runs
    ready = prepared.prepare(stored_opt._buckets[0])
    assert list(ready.copies) == [0] and ready.layout[:, 0].tolist() == [0, 8]
    for a, b in zip(plain, stored):
        assert torch.equal(plain_opt.state[a]["codes"], stored_opt.state[b]["codes"])
        assert torch.equal(a.detach(), b.detach())
