"""gefen-compile: Gefen, AdamW at ~1 byte of optimizer state per parameter, for any PyTorch
script."""

from .memory import MemoryReport, memory_report
from .optim import Gefen

__all__ = ["Gefen", "MemoryReport", "memory_report"]
__version__ = "0.1.0"
