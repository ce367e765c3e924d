"""Label-free model selection over the per-epoch records of an adaptation run."""
from __future__ import annotations

from typing import Any, Iterable

from ..errors import ConfigError

# score -> True when higher is better
SCORES = {"snd": True, "im": True, "entropy": False}


def select_epoch(history: Any, score: str = "snd") -> dict:
    """The epoch record with the best label-free ``score`` ('snd' or 'im': highest; 'entropy': lowest).

    ``history`` is a :class:`dfkt.core.loop.History`, a ``Result`` (its ``.history``) or a list of
    records as the loop writes them (``{"epoch": ..., "acc": ..., "entropy": ..., "im": ..., "snd": ...}``).
    Target labels are never looked at; ties go to the later epoch. The headline figure of a run
    stays its last epoch: this helper is for reporting what a label-free criterion would pick.
    """
    if score not in SCORES:
        raise ConfigError(f"unknown selection score {score!r}; use one of {sorted(SCORES)}.")
    if hasattr(history, "history") and not isinstance(history, (list, tuple)):
        history = history.history
    records: Iterable[dict] = history.records if hasattr(history, "records") else history
    recs = [r for r in records if isinstance(r, dict) and r.get(score) is not None]
    if not recs:
        raise ConfigError(f"no epoch record has the label-free score {score!r}; run the adaptation with an "
                          f"evaluation every epoch (train.eval_every: 1) so the loop records it.")
    higher = SCORES[score]
    best = recs[0]
    for r in recs[1:]:
        v, b = float(r[score]), float(best[score])
        if (v >= b) if higher else (v <= b):
            best = r
    return best
