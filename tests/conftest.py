import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors; it is read when
# a kernel is defined, so before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The slow reference implementation lives beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def adamw_state_allocations(monkeypatch):
    """Every call of AdamW's state allocation (torch.optim.Adam._init_group, AdamW's too)."""
    calls = []
    allocate = torch.optim.Adam._init_group

    def counted(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return allocate(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "_init_group", counted)
    return calls


@pytest.fixture
def no_conversion_at_load():
    """A process where neither the compiler backend (installed at its import, which an earlier
    test may have made) nor the patch converts optimizers that load Gefen checkpoints."""
    from gefen_compile import convert_at_load

    rules = dict(convert_at_load._RULES)
    for owner in rules:
        convert_at_load.remove(owner)
    yield
    for owner, rule in rules.items():
        convert_at_load.install(owner, rule)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo's caches (and its recompile limit per code object,
    such as Gefen's step) are per process, and tests must not share them."""
    torch._dynamo.reset()
    yield
