"""gefen-compile: Gefen, AdamW at ~1 byte of optimizer state per parameter, for any PyTorch
script."""

from .checkpoint import adamw_state_dict
from .convert import convert
from .memory import MemoryReport, memory_report
from .muon import GefenMuon
from .optim import Gefen
from .patch import patch_adamw, patched_adamw, unpatch_adamw

__all__ = ["Gefen", "GefenMuon", "MemoryReport", "adamw_state_dict", "convert", "memory_report",
           "patch_adamw", "patched_adamw", "unpatch_adamw"]
__version__ = "0.1.0"
