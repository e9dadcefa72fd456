"""FX passes that turn a captured AdamW step into Gefen's fused step.

Each pass is a plain function, GraphModule in, GraphModule out, plus a report of what it found
or did, usable outside torch.compile:

- :func:`match_adamw` finds every per-parameter AdamW update by its dataflow;
- :func:`rewrite_state` converts the optimizer owning them to Gefen (state migrated);
- :func:`lower_fused` replaces all of them by one ``gefen::step_`` call per Gefen bucket.

:func:`rewrite_adamw_steps` runs the three; a graph with no AdamW update passes unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch.fx import GraphModule

from .lower_fused import LowerReport, lower_fused
from .match_adamw import AdamWUpdate, MatchReport, match_adamw
from .rewrite_state import StateReport, rewrite_state

log = logging.getLogger("gefen_compile")


@dataclass
class RewriteReport:
    """The reports of the three passes (``state`` and ``lowered`` are None when nothing
    matched)."""

    matched: MatchReport
    state: StateReport | None = None
    lowered: LowerReport | None = None

    def __str__(self) -> str:
        return "\n".join(str(r) for r in (self.matched, self.state, self.lowered) if r is not None)


def rewrite_adamw_steps(
    gm: GraphModule, example_inputs=None, release_state: bool = True
) -> tuple[GraphModule, RewriteReport]:
    """Match, convert and lower every AdamW update of ``gm``. ``example_inputs``: the real
    values of the graph's placeholders (parameters and gradients are found by identity).
    ``release_state=False`` keeps AdamW's moments until ``report.state.release()`` (a
    torch.compile backend releases them after dynamo built its guards)."""
    gm, matched = match_adamw(gm, example_inputs)
    report = RewriteReport(matched)
    if not matched.updates:
        return gm, report
    gm, report.state = rewrite_state(gm, matched, example_inputs)
    gm, report.lowered = lower_fused(gm, matched, report.state)
    log.info("rewrote %d AdamW update(s) into %d gefen::step_ call(s)",
             len(matched.updates), len(report.lowered.calls))
    if release_state:
        report.state.release()
    return gm, report


__all__ = ["AdamWUpdate", "LowerReport", "MatchReport", "RewriteReport", "StateReport",
           "lower_fused", "match_adamw", "rewrite_adamw_steps", "rewrite_state"]
