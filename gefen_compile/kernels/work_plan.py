"""How the CUDA kernel (kernels/triton_step.py) divides a bucket's work among its programs.

Built once per bucket, never per step. Each *item* is a run of whole rows (magnitude blocks) of
one parameter, about ``ITEM_ELEMENTS`` elements, that one program owns; its fields are read with
independent loads, so a program starts on its data without a search or a chain of metadata
loads. Items are grouped into *classes*, one kernel specialisation each, by the shape of the
tile their rows fit: ``cols`` (the row length rounded up to a power of two, at most
``MAX_COLS``; longer rows loop over column chunks: ``multi``), whether the second moment is per
element (period 1), and whether every row length is a multiple of ``ALIGN`` elements, which
with 16-byte aligned buffers lets the compiler use 128-bit memory accesses.

No triton import here: the plan is built wherever buckets are.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..state import SEG_BLOCK, SEG_CODE, SEG_ROW0, SEG_V, SEG_V_PER_ELEMENT

# Elements of one tile (a program's inner step), and about how many one program owns.
TILE = 2048
ITEM_ELEMENTS = 16384
# Rows longer than this loop over column chunks of this size.
MAX_COLS = 1024
# Elements (of codes) and bytes (of pointers) of a 128-bit access.
ALIGN = 16
# Columns of a work item: parameter index, first magnitude (global row), rows, row length,
# index of its first code, of its first second moment, and its first element in the parameter.
W_PARAM, W_ROW0, W_ROWS, W_LEN, W_CODE, W_V, W_ELEM = range(7)
WORK_FIELDS = 7
# A class is described to the custom op by CLASS_FIELDS ints: cols, per_element, multi, aligned.
CLASS_FIELDS = 4


class WorkClass(NamedTuple):
    """The kernel specialisation one class of items runs (see the module docstring)."""

    cols: int
    per_element: bool
    multi: bool
    aligned: bool

    @property
    def rows(self) -> int:
        """Rows of a tile."""
        # Whole rows of 1024 one at a time: two at once leave Triton 3.6's ptxas spilling.
        return max(1, (TILE // 2 if self.cols >= 1024 and not self.multi else TILE) // self.cols)


def row_class(length: int) -> tuple[int, bool]:
    """(cols, multi) of rows of ``length`` elements."""
    if length > MAX_COLS:
        return MAX_COLS, True
    return 1 << (length - 1).bit_length(), False


def work_plan(segments: torch.Tensor, numels: list[int]) -> tuple[list[torch.Tensor], list[int]]:
    """The work tables of a bucket (int64 [items, WORK_FIELDS] each, on ``segments``' device),
    one per class, and the classes flattened (CLASS_FIELDS ints each), as ``gefen::step_`` takes
    them."""
    items: dict[WorkClass, list[list[int]]] = {}
    for p, (seg, n) in enumerate(zip(segments.cpu().tolist(), numels)):
        length, per_element = seg[SEG_BLOCK], bool(seg[SEG_V_PER_ELEMENT])
        if length >= 2**31:
            raise NotImplementedError(
                f"gefen_compile: parameter {p} of its bucket has blocks of {length} elements; "
                "the CUDA kernel addresses a block with 32-bit offsets: reshape the parameter "
                "so that its period is below 2**31"
            )
        full_rows, tail = divmod(n, length)
        # A ragged parameter's short last row is an item of its own, in the class of its length.
        for rows, row_length, first in ((full_rows, length, 0), (int(tail > 0), tail, full_rows)):
            cols, multi = row_class(max(row_length, 1))
            key = WorkClass(cols, per_element, multi, row_length % ALIGN == 0)
            per_item = max(1, ITEM_ELEMENTS // max(row_length, 1))
            for row in range(first, first + rows, per_item):
                elem = row * length
                v = seg[SEG_V] + (elem if per_element else row)
                items.setdefault(key, []).append(
                    [p, seg[SEG_ROW0] + row, min(per_item, first + rows - row), row_length,
                     seg[SEG_CODE] + elem, v, elem]
                )
    classes = sorted(items)
    tables = [torch.tensor(items[c], dtype=torch.int64, device="cpu").to(segments.device)
              for c in classes]
    return tables, [int(x) for c in classes for x in c]


def classes(flat: list[int]) -> list[WorkClass]:
    """The classes of a work plan, from their flattened form."""
    return [
        WorkClass(flat[i], bool(flat[i + 1]), bool(flat[i + 2]), bool(flat[i + 3]))
        for i in range(0, len(flat), CLASS_FIELDS)
    ]
