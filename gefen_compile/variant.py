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
- Periods of tensors of 2 or more dimensions: published, as inferred; robust, a block never
  spans rows (a row: the elements of one index of the first dimension, numel / shape[0], as a
  Linear weight's input features or a convolution's filter; of a 3-D tensor, its last
  dimension where that holds more than 8 elements, as each expert's input features in a
  fused MoE tensor (experts, out, in), and a 1-D convolution's kernel if longer than 8): an
  inferred period longer than a row of more than 8 elements becomes the row. Evidence
  (benchmarks/results/embedding_periods.md): on examples/train_gpt.py the tied 256x256 byte
  embedding is inferred at period 2048, so 8 tokens' rows, whose gradients differ up to 121x,
  share a second moment; one per row brings Gefen from +2.67% to +1.81% over AdamW's validation
  loss (three seeds, better on each), for +0.0006 bytes/param. On GPT-2 small, a Llama-shaped
  model and a ResNet-18-shaped CNN no inferred period spans rows, so the rule changes nothing
  there; where it applies it costs at most 2 * itemsize * (1/row - 1/P) bytes/param on that
  tensor (<= 0.031 for rows of 256 or more). A tiny Mixtral (transformers' fused experts,
  8x64x128, 200 steps; benchmarks/moe_expert_rows.py) had its experts' down projection
  inferred at period 2048, 16 rows whose AdamW second moments differ up to 8.8x: +1.6% and
  +6.4% over AdamW's loss on two seeds, and -0.2% and -0.2% with a block per row. A 1-D
  convolution (out, in, k) with k > 8 pays for the 3-D rule, which cannot tell it from experts
  by shape: wav2vec2's positional convolution (768, 48, 128) gets period 128 where its
  filter, 6144, holds the inferred 1536 (1.063 bytes/param against 1.005); 4-D convolutions
  keep their filters as rows. Rows of 8 elements or fewer are left alone: a
  second moment per row would cost more than a byte per parameter.
- Thin codebooks: published, the codebook learned at the first step is final, whatever it was
  learned from; robust, one learned from too few values for 256 distinct entries (fewer
  non-empty histogram bins than entries, so GEFEN_SPEC pads it with repeats) is provisional:
  while it is, each step learns it again from every histogram so far, with that step's
  gradients (those of parameters with state, and new parameters' first ones), and maps stored
  codes to the new entries nearest their old ones; it becomes final once it is not thin. Evidence (benchmarks/staged_unfreezing.py: an MLP, 300 steps, where only a
  one-element output scale, or the 8-element last bias, has a gradient during the first 5
  steps; medians of 3 seeds): with the first codebook kept (4, or 10, distinct values) Gefen's
  final loss was 0.64 (1.0e-2) against AdamW's 2.4e-6 (2.1e-6); learned again, 3.0e-5
  (1.4e-5), as when every parameter trains from the first step (2.3e-5). A codebook learned
  from a whole model's first gradients is not thin, so the rule changes nothing there. In a
  tiny model every parameter has a gradient from the first step, so none joins later; learned
  again only as parameters join, its codebook stayed thin for good (a 5-element vector fit:
  loss 4.0 against AdamW's 8.4e-7; logistic regression, 15 parameters: 0.14 against 0.092),
  and learned again at each step it matches AdamW's (8.4e-7; 0.092).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .partition import MAX_MAGNITUDE_BLOCK, MIN_PEAK_PERIOD, published_magnitude_block

# Rows this short keep their inferred period (published inference never gives 2..8 anyway).
MAX_ROW_LEFT_ALONE = MIN_PEAK_PERIOD

VARIANT_NAMES = ("robust", "published")


@dataclass(frozen=True)
class Variant:
    """The rules of one variant (see the module docstring)."""

    name: str
    rows_bound_periods: bool  # a second-moment block never spans rows of a 2-D+ tensor
    ragged_blocks: bool  # period-1 magnitude blocks of 256, the last one shorter
    rows_are_blocks: bool  # histogram rows are magnitude blocks, not periods
    zero_in_codebook: bool  # the codebook's DP pins 0.0 beside -1 and +1
    zero_gradients_wait: bool  # an all-zero first gradient teaches nothing
    relearns_thin_codebook: bool  # a codebook of repeated entries is provisional

    def period(self, shape: tuple[int, ...], inferred: int) -> int:
        """The period of a tensor of ``shape`` whose first gradient gave ``inferred``."""
        if self.rows_bound_periods and len(shape) >= 2 and shape[0] > 0:
            fused = len(shape) == 3 and shape[-1] > MAX_ROW_LEFT_ALONE  # (experts, out, in)
            row = shape[-1] if fused else math.prod(shape) // shape[0]
            if row > MAX_ROW_LEFT_ALONE and inferred > row:
                return row
        return inferred

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


ROBUST = Variant("robust", True, True, True, True, True, True)
PUBLISHED = Variant("published", False, False, False, False, False, False)
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
