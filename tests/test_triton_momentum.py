"""GefenMuon's momentum kernel in Triton (kernels/triton_momentum.py) against the plain-torch core
(kernels/torch_step.py ``momentum_update``), bit for bit: codes, magnitudes and the bf16 update.
Without a GPU it runs in Triton's interpreter on CPU tensors (conftest.py); on a CUDA machine
the same tests run the compiled kernel. tests/test_triton_aot.py compiles it for sm_80/sm_90."""

import math

import pytest
import torch

pytest.importorskip("triton")

from gefen_compile.codebook import NearestCode  # noqa: E402
from gefen_compile.kernels import momentum, native, torch_step, triton_momentum  # noqa: E402

# The interpreter divides masked-off lanes too (0 / 0): their results are never stored.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (block, numel): blocks of 64 (many rows to a tile, several tiles to a program), 256 with a
# short last row (232 elements; 1 element), 1024 (one row a tile), 3072 (column chunks) whole
# and ragged (a last row of two chunks, the second short), 40 (not a multiple of 16, masked to
# 64 columns), 1 (a prime numel under the published variant).
CASES = [(64, 64 * 32 * 9), (256, 1000), (256, 256 * 9 + 1), (1024, 1024 * 5), (3072, 3072 * 3),
         (3072, 3072 * 2 + 2000), (40, 40 * 13), (1, 37)]


def _nearest(seed=0):
    """A learned-looking codebook: -1, 0, +1 pinned, the rest spread unevenly."""
    gen = torch.Generator().manual_seed(seed)
    entries = torch.cat([torch.tensor([-1.0, 0.0, 1.0]), torch.rand(253, generator=gen) * 2 - 1])
    return NearestCode(torch.sort(entries)[0])


def _state(dtype, block, numel, seed):
    """Gradient, codes and magnitudes of one parameter: some zero gradients, a zero magnitude
    (its old moment is 0) and an all-zero row (its new magnitude is 0: codes 0)."""
    gen = torch.Generator().manual_seed(seed)
    rows = -(-numel // block)
    g = (torch.randn(numel, generator=gen) * torch.rand(numel, generator=gen).exp()).to(dtype)
    g[::97] = 0.0
    codes = torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=gen)
    magnitude = (torch.rand(rows, generator=gen) * 4).to(dtype)
    magnitude[min(1, rows - 1)] = 0.0
    if rows > 2:
        g[2 * block: 3 * block] = 0.0
        magnitude[2] = 0.0
    return g, codes, magnitude


def _bytes(t):
    """The tensor's bytes, NaN payloads included (torch.equal calls NaN unequal to itself)."""
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _tables(nearest, g):
    """The codebook's tables on ``g``'s device, in its compute dtype."""
    return nearest.tables(g.device, torch.float64 if g.dtype == torch.float64 else torch.float32)


def _kernel(g, codes, magnitude, block, nearest, nesterov, momentum_=0.95):
    tables = nearest.tables(g.device, torch.float32)
    return triton_momentum.momentum_step(g, codes, magnitude, block=block, tables=tables,
                                         momentum=momentum_, nesterov=nesterov)


@pytest.mark.parametrize("block,numel", CASES)
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_torch_path(dtype, nesterov, block, numel):
    nearest = _nearest()
    g, codes, magnitude = (t.to(DEVICE) for t in _state(dtype, block, numel, seed=block + numel))
    codes2, magnitude2 = codes.clone(), magnitude.clone()
    # 0.9: 1 - momentum rounds differently in fp32 than from float64, as torch rounds it.
    update = _kernel(g.view(-1, block) if numel % block == 0 else g, codes, magnitude, block,
                     nearest, nesterov, momentum_=0.9)
    expected = torch_step.momentum_update(
        g, codes2, magnitude2, block=block, codebook=nearest.tables(DEVICE, torch.float32).codebook,
        nearest=nearest, momentum=0.9, nesterov=nesterov)
    assert update.dtype == torch.bfloat16 and update.numel() == numel
    assert _bytes(codes) == _bytes(codes2)
    assert _bytes(magnitude) == _bytes(magnitude2)
    assert _bytes(update) == _bytes(expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_values_as_the_c_kernel(dtype):
    """NaN and infinite gradients, an infinite old magnitude (its 0.0 entries give 0 * inf =
    NaN moments), a row of NaN only. Every kernel leaves NaN moments out of a block's peak (the
    C rows' ``mag > peak``): compared with the C kernel and the torch path, byte for byte."""
    if native.library is None:
        pytest.skip("the C library is not built")
    block, numel = 64, 64 * 7
    nearest = _nearest(1)
    g, codes, magnitude = _state(dtype, block, numel, seed=5)
    g[5] = math.nan
    g[block + 3], g[block + 9] = math.inf, -math.inf  # opposite infinities in one row
    g[3 * block + 1] = -math.inf
    g[4 * block: 5 * block] = math.nan
    magnitude[5] = math.inf
    codes[5 * block] = int((nearest.tables("cpu", torch.float32).codebook == 0).nonzero())
    results = []
    for device, step in ((DEVICE, "triton"), ("cpu", "c"), ("cpu", "torch")):
        c, m = codes.clone().to(device), magnitude.clone().to(device)
        if step == "triton":
            u = _kernel(g.to(device), c, m, block, nearest, True)
        elif step == "c":
            u = momentum.momentum_step(g, c, m, block=block, tables=_tables(nearest, g), momentum=0.95,
                                       nesterov=True)
        else:
            u = torch_step.momentum_update(
                g, c, m, block=block, codebook=nearest.tables("cpu", torch.float32).codebook,
                nearest=nearest, momentum=0.95, nesterov=True)
        results.append((c.cpu(), m.cpu(), u.cpu()))
    (codes1, mag1, update1), (codes2, mag2, update2), (codes3, mag3, update3) = results
    assert _bytes(codes1) == _bytes(codes2)
    assert _bytes(mag1) == _bytes(mag2)
    assert _bytes(update1) == _bytes(update2)
    assert torch.isinf(mag1[1]) and torch.isinf(mag1[3]) and mag1[4] == 0.0
    # The torch path leaves NaN moments out of the peak too: the same state, byte for byte.
    assert _bytes(mag1) == _bytes(mag3) and _bytes(codes1) == _bytes(codes3)
    # Updates NaN alike (row 1: an infinite magnitude times the entry 0.0, inf - inf), whose
    # bf16 bits torch's vectorised rounding writes as 0xFFFF; the rest bit for bit.
    nan = torch.isnan(update1)
    assert torch.equal(nan, torch.isnan(update3))
    assert _bytes(update1[~nan]) == _bytes(update3[~nan])


def test_programs_own_runs_of_tiles_and_the_last_the_short_row(monkeypatch):
    """A large parameter: several tiles per program, a grid of whole runs plus one program for
    the short last row; a small one: one tile per program."""
    launches = []
    launch = triton_momentum._launch

    def record(kernel, grid, args, meta):
        launches.append((grid, args[6], meta["ROWS"]))
        launch(kernel, grid, args, meta)

    monkeypatch.setattr(triton_momentum, "_launch", record)
    monkeypatch.setattr(triton_momentum, "_multiprocessors", lambda device: 1)
    nearest = _nearest()
    for block, numel in ((64, 64 * 32 * 40 + 17), (64, 64 * 40)):
        g, codes, magnitude = (t.to(DEVICE) for t in _state(torch.float32, block, numel, 1))
        codes2, magnitude2 = codes.clone(), magnitude.clone()
        update = _kernel(g, codes, magnitude, block, nearest, True)
        expected = torch_step.momentum_update(
            g, codes2, magnitude2, block=block,
            codebook=nearest.tables(DEVICE, torch.float32).codebook, nearest=nearest,
            momentum=0.95, nesterov=True)
        assert _bytes(codes) == _bytes(codes2) and _bytes(update) == _bytes(expected)
    ((big_grid,), big_rows, rows), ((small_grid,), small_rows, _) = launches
    assert big_rows == 8 * rows  # ITEM_ELEMENTS: 16384 elements a program
    assert big_grid == -(-(32 * 40) // big_rows) + 1  # whole runs, then the short row
    assert small_rows == rows and small_grid == 2


def test_dispatch_and_contract():
    """fp64 and blocks of 2**30 or more stay on the torch path; the native paths refuse state
    that does not match the gradient, naming it."""
    g = torch.zeros(10, 100)
    assert triton_momentum.supports(g, 256)
    assert not triton_momentum.supports(g.double(), 256)
    assert not triton_momentum.supports(g, 2**30)
    if native.library is None:
        pytest.skip("the C library is not built")
    codes = torch.zeros(1000, dtype=torch.uint8)
    with pytest.raises(ValueError, match="3 magnitudes for 4 blocks of 256"):
        momentum.momentum_step(g, codes, torch.zeros(3), block=256, tables=_tables(_nearest(), g),
                               momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="magnitude torch.bfloat16: they must match"):
        momentum.momentum_step(g, codes, torch.zeros(4, dtype=torch.bfloat16), block=256,
                               tables=_tables(_nearest(), g), momentum=0.9, nesterov=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA dispatch needs a GPU")
def test_cuda_steps_take_the_kernel(monkeypatch):
    """momentum.momentum_step (GefenMuon's entry) runs CUDA fp32/bf16/fp16 steps in this kernel
    and fp64 in torch, with the torch path's bits."""
    calls = []
    kernel = triton_momentum.momentum_step
    monkeypatch.setattr(triton_momentum, "momentum_step",
                        lambda *a, **k: calls.append(a[0].dtype) or kernel(*a, **k))
    nearest = _nearest()
    for dtype in (torch.bfloat16, torch.float64):
        g, codes, magnitude = (t.to(DEVICE) for t in _state(dtype, 256, 1000, seed=2))
        codes2, magnitude2 = codes.clone(), magnitude.clone()
        update = momentum.momentum_step(g, codes, magnitude, block=256, tables=_tables(nearest, g),
                                        momentum=0.95, nesterov=True)
        tables = nearest.tables(DEVICE, torch.float64 if dtype == torch.float64 else torch.float32)
        expected = torch_step.momentum_update(g, codes2, magnitude2, block=256,
                                              codebook=tables.codebook, nearest=nearest,
                                              momentum=0.95, nesterov=True)
        assert _bytes(codes) == _bytes(codes2) and _bytes(update) == _bytes(expected)
    assert calls == [torch.bfloat16]
