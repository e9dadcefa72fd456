import os
import sys
from pathlib import Path

import torch

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors; it is read when
# a kernel is defined, so before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The slow reference implementation lives beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
