"""memory_report: per-tensor state bytes, totals, and the AdamW comparison."""

import pytest
import torch

from gefen_compile import Gefen, memory_report


def stepped_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 7)).to(dtype)
    unused = torch.nn.Parameter(torch.zeros(10, dtype=dtype))
    opt = Gefen([*model.named_parameters(), ("unused", unused)])
    for p in model.parameters():
        # Rows with their own scales: the period is the row length.
        scales = torch.exp(torch.randn(p.shape[0], *[1] * (p.dim() - 1)))
        p.grad = (scales * torch.randn(p.shape)).to(dtype)
    opt.step()
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_account_for_every_state_tensor(dtype):
    model, opt = stepped_model(dtype)
    report = memory_report(opt)
    rows = {row.name: row for row in report.tensors}
    assert list(rows) == ["0.weight", "0.bias", "1.weight", "1.bias", "unused"]
    esize = torch.finfo(dtype).bits // 8
    for name, p in model.named_parameters():
        row, state = rows[name], opt.state[p]
        n, period = p.numel(), state["period"]
        assert row.period == period and row.shape == tuple(p.shape) and row.numel == n
        vmean = n // period if period > 1 else n
        block = period if period > 1 else n // state["magnitude"].numel()
        assert row.gefen_bytes == n + (vmean + n // block) * esize + 4  # codes, vmean, magnitude, step
        assert row.baseline_bytes == 2 * n * esize + 4
    weight = rows["0.weight"]
    assert weight.period == 64  # so 1 + 2 * esize / 64 bytes per element, plus the step
    assert rows["unused"].period is None and rows["unused"].gefen_bytes == 0


def test_totals_and_table():
    _, opt = stepped_model()
    report = memory_report(opt)
    assert report.numel == sum(r.numel for r in report.tensors)
    assert report.gefen_bytes == sum(r.gefen_bytes for r in report.tensors)
    assert report.adamw_bytes_per_param == pytest.approx(8.0, rel=0.01)
    assert report.gefen_bytes_per_param < 1.2
    table = str(report)
    lines = table.splitlines()
    assert lines[0].split() == ["tensor", "shape", "dtype", "period", "Gefen", "bytes", "AdamW", "bytes"]
    assert any(line.startswith("0.weight") and "96x64" in line and " 64 " in line for line in lines)
    assert f"{report.gefen_bytes_per_param:.3f}" in table and f"{report.gefen_bytes:,}" in table
    assert "1 tensor(s) have had no gradient yet" in table


def test_unnamed_groups_get_positional_names():
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(4))
    report = memory_report(Gefen([{"params": [p]}, {"params": [q], "lr": 0.1}]))
    assert [r.name for r in report.tensors] == ["group0.param0", "group1.param0"]


def test_another_optimizer_is_refused_and_a_wrapper_looked_through():
    params = [torch.nn.Parameter(torch.randn(64, 32))]
    adamw = torch.optim.AdamW(params)
    params[0].grad = torch.randn(64, 32)
    adamw.step()
    with pytest.raises(TypeError, match=r"memory_report: AdamW is not a Gefen or GefenMuon .*"
                                        r"gefen_compile\.convert\(optimizer\)"):
        memory_report(adamw)

    class Wrapper:  # as accelerate's AcceleratedOptimizer holds the optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    gefen = Gefen(params)
    gefen.step()
    assert memory_report(Wrapper(gefen)) == memory_report(gefen)
    with pytest.raises(TypeError, match="memory_report: Wrapper wraps AdamW, not a Gefen"):
        memory_report(Wrapper(adamw))
    adamw._gefen_left_alone = True  # what the patch marks on an AdamW it does not convert
    with pytest.raises(TypeError, match="the patch left it as it is, saying why in a WARNING"):
        memory_report(Wrapper(adamw))
