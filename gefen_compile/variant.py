"""The two variants of Gefen (GEFEN_SPEC "Robust variant (the default)"): the robust default and
the exact published method. They differ only in the rules collected here; every kernel and
every other module runs both, reading these rules.

- Period-1 magnitude blocks: published, Q = the largest divisor of n that is at most 256 (Q = 1
  for a prime n: 9 bytes/param); robust, 256 elements with a shorter last block, so every
  period-1 tensor costs ~5 bytes/param.
- Histogram rows: published, the period (a period-1 tensor contributes only -1, 0 and +1);
  robust, the magnitude block, the elements its first moment will share a magnitude with.
- Codebook: published, the DP with -1 and +1 pinned; robust, with -1, 0.0 and +1 pinned, so a
  zero first moment is stored exactly and a parameter whose gradients are zero does not move.
- All-zero first gradients: published, learned from (period 1, a codebook of zeros); robust,
  they teach nothing: the parameter's period, and the codebook while none exists, wait for a
  non-zero gradient, and decoupled weight decay still applies meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

from .partition import MAX_MAGNITUDE_BLOCK, published_magnitude_block

VARIANT_NAMES = ("robust", "published")


@dataclass(frozen=True)
class Variant:
    """The rules of one variant (see the module docstring)."""

    name: str
    ragged_blocks: bool  # period-1 magnitude blocks of 256, the last one shorter
    rows_are_blocks: bool  # histogram rows are magnitude blocks, not periods
    zero_in_codebook: bool  # the codebook's DP pins 0.0 beside -1 and +1
    zero_gradients_wait: bool  # an all-zero first gradient teaches nothing

    def magnitude_block(self, n: int, period: int) -> int:
        """Elements per first-moment magnitude of an ``n``-element tensor of ``period`` (the
        last block of a robust period-1 tensor may be shorter)."""
        if period > 1:
            return period
        if self.ragged_blocks:
            return max(1, min(n, MAX_MAGNITUDE_BLOCK))
        return published_magnitude_block(n)

    def histogram_row(self, n: int, period: int) -> int:
        """Elements normalised together in the codebook's histogram."""
        return self.magnitude_block(n, period) if self.rows_are_blocks else period


ROBUST = Variant("robust", True, True, True, True)
PUBLISHED = Variant("published", False, False, False, False)
_BY_NAME = {v.name: v for v in (ROBUST, PUBLISHED)}


def variant_named(name: object, where: str = "Gefen") -> Variant:
    """The variant called ``name``; a ValueError naming the choices otherwise."""
    if name not in _BY_NAME:
        raise ValueError(
            f"{where}: variant must be one of {VARIANT_NAMES} (the robust default, or the exact "
            f"published method), got {name!r}"
        )
    return _BY_NAME[name]


def saved_variant(state_dict: dict) -> Variant:
    """The variant a ``Gefen.state_dict()`` was saved with; checkpoints from before the variant
    existed hold published state."""
    return variant_named(state_dict.get("variant", PUBLISHED.name), "Gefen.load_state_dict")
