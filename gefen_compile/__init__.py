"""gefen-compile: Gefen, AdamW at ~1 byte of optimizer state per parameter (and GefenMuon, Muon
at ~1 byte of momentum per parameter), for any PyTorch script."""

from .checkpoint import adamw_state_dict
from .convert import convert
from .memory import MemoryReport, memory_report
from .muon import GefenMuon
from .optim import Gefen
from .patch import patch_adamw, patch_muon, patched_adamw, unpatch_adamw, unpatch_muon

__all__ = ["Gefen", "GefenMuon", "MemoryReport", "adamw_state_dict", "convert", "memory_report",
           "patch_adamw", "patch_muon", "patched_adamw", "unpatch_adamw", "unpatch_muon"]
__version__ = "0.1.0"
