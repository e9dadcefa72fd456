"""FX passes that turn a captured AdamW step into Gefen's fused step.

Each pass is a plain function, GraphModule in, GraphModule out, plus a report of what it found
or did, usable outside torch.compile:

- :func:`match_adamw` finds every per-parameter AdamW update by its dataflow;
- :func:`rewrite_state` converts the optimizer owning them to Gefen (state migrated);
- :func:`lower_fused` replaces all of them by one ``gefen::step_`` call per Gefen bucket.

:func:`rewrite_adamw_steps` runs the three, checking everything before changing anything: a graph
with no AdamW update, or one it cannot rewrite (the report says why), passes unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch.fx import GraphModule

from .lower_fused import LowerReport, lower_fused, lowering_problem
from .match_adamw import AdamWUpdate, MatchReport, NotRewritten, match_adamw
from .rewrite_state import StateReport, convert_owners, plan_state, rewrite_state

log = logging.getLogger("gefen_compile")


@dataclass
class RewriteReport:
    """The reports of the three passes (``state`` and ``lowered`` are None when nothing was
    rewritten; ``refused`` then says why, if updates matched)."""

    matched: MatchReport
    state: StateReport | None = None
    lowered: LowerReport | None = None
    refused: str | None = None

    def __str__(self) -> str:
        lines = [str(r) for r in (self.matched, self.state, self.lowered) if r is not None]
        return "\n".join(lines + ([f"left unchanged: {self.refused}"] if self.refused else []))


def rewrite_adamw_steps(
    gm: GraphModule, example_inputs=None, release_state: bool = True, *, runs_once: bool = False
) -> tuple[GraphModule, RewriteReport]:
    """Match, convert and lower every AdamW update of ``gm``. ``example_inputs``: the real
    values of the graph's placeholders (parameters and gradients are found by identity).
    ``release_state=False`` keeps AdamW's moments until ``report.state.release()`` (a
    torch.compile backend releases them after dynamo built its guards). ``runs_once``: the
    caller runs the new graph once, with ``example_inputs``, and never again (the backend:
    converting the optimizer changes its class, so dynamo traces its next step anew); a
    parameter whose example gradient is all zero, which Gefen starts later, is then accepted.

    Everything is checked before anything changes: a graph that cannot be rewritten (the
    updates are no live AdamW's, another write of a parameter follows its update, ...) is
    returned unchanged, its optimizer untouched, with ``report.refused`` saying why (logged)."""
    gm, matched = match_adamw(gm, example_inputs)
    report = RewriteReport(matched)
    if not matched.updates:
        if matched.unmatched:
            log.info("left a graph that writes tensors in place unchanged, no AdamW update "
                     "matched:\n%s", matched)
        return gm, report
    try:
        problem = lowering_problem(matched)
        if problem:
            raise NotRewritten(problem)
        plan = plan_state(gm, matched, example_inputs, runs_once=runs_once)
    except NotRewritten as refusal:
        report.refused = str(refusal)
        log.log(logging.INFO if refusal.quiet else logging.WARNING,
                "left a graph with %d AdamW-like update(s) unchanged: %s",
                len(matched.updates), str(refusal))  # not the exception: its frames hold tensors
        return gm, report
    report.state = convert_owners(plan)
    gm, report.lowered = lower_fused(gm, matched, report.state)
    log.info("rewrote %d AdamW update(s) into %d gefen::step_ call(s)",
             len(matched.updates), len(report.lowered.calls))
    if release_state:
        report.state.release()
    return gm, report


__all__ = ["AdamWUpdate", "LowerReport", "MatchReport", "NotRewritten", "RewriteReport",
           "StateReport", "lower_fused", "match_adamw", "rewrite_adamw_steps", "rewrite_state"]
