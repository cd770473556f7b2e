"""When a run evaluates: after every epoch, or only where ASHA makes a decision.

A trial's evaluation costs more than its training on the large models (docs/SCALING.md). ASHA
looks at a trial only at its rung milestones ``grace x rf^k`` (Ray's ``_Bracket``: ``k <
int(log(max_t / grace) / log(rf) + 1)``), comparing the result of the first report at or after
each milestone, and stops every trial at ``max_t``. Under ``eval.every: rungs`` a trial therefore
evaluates (and reports) at the first epoch at or after each milestone, at ``max_t`` and at its own
last epoch, and nowhere else: ASHA takes exactly the decisions it would take on a report per
epoch, because Tune's time attribute is the reported ``epoch``, not the count of reports.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["rung_milestones", "rung_epochs", "evaluation_epochs"]


def rung_milestones(grace_period: int, reduction_factor: float, max_t: int) -> list[float]:
    """ASHA's milestones, ascending, computed exactly as Ray's ``_Bracket`` (``s = 0``)."""
    if grace_period < 1 or reduction_factor <= 1 or max_t < grace_period:
        raise ValueError(f"ASHA needs 1 <= grace_period <= max_t and reduction_factor > 1, got "
                         f"grace_period {grace_period}, reduction_factor {reduction_factor}, max_t {max_t}")
    count = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
    return [grace_period * reduction_factor**k for k in range(count)]


def rung_epochs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The epochs at which ASHA decides about a trial: the first epoch at or after each
    milestone, and ``max_t`` (where ASHA stops every trial)."""
    epochs = {math.ceil(m) for m in rung_milestones(grace_period, reduction_factor, max_t) if m <= max_t}
    return sorted(epochs | {max_t})


def evaluation_epochs(every: str, epochs: int, rungs: list[int] | tuple[int, ...] = ()) -> list[int]:
    """The epochs (1-based) of a run of ``epochs`` epochs that are evaluated and reported.

    ``every="epoch"``: all of them; ``"rungs"``: ``rungs`` (from :func:`rung_epochs`) within the
    run, and always the last epoch; ``"last"``: the last epoch only.
    """
    if every == "epoch":
        return list(range(1, epochs + 1))
    if every == "rungs":
        return sorted({e for e in rungs if 1 <= e <= epochs} | {epochs})
    if every == "last":
        return [epochs]
    raise ValueError(f"eval.every must be 'epoch' or 'rungs', got {every!r}")
