"""Seeds where they decide something: a sweep's `close_call_seeds` trains more seeds of the two settings of every
close call (analysis.close_calls: a cell whose best setting and runner-up are within SEPARATION standard errors)
among the sweep's own finished points, and of no other setting.

Which settings get the seeds is decided by the results of the sweep's own points alone, so a rerun plans the same
points and skips the finished ones. The fits then average every seed of a setting, and the report says whether the
added seeds separate each pair. Candidates are the sweep's points under `close_call_seeds` (sweep.expand of the sweep
with those seeds).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from .analysis import best_per_cell, cell_key, close_calls, mean_of_seeds
from .points import point_from_record

if TYPE_CHECKING:  # sweep.py imports this module
    from .sweep import SweepPoint


def close_call_settings(records: Sequence[dict[str, Any]]) -> list[str]:
    """The settings of every close call among finished point records (sweep.run_point's), each call's best setting
    before its runner-up, in the order of the cells."""
    kept, beaten = best_per_cell(mean_of_seeds([point_from_record(record) for record in records]))
    calls, _ = close_calls(kept, beaten)
    return list(dict.fromkeys(setting for call in calls for setting in (call.best.setting, call.runner_up.setting)))


def close_call_bound(candidates: Sequence[SweepPoint]) -> list[SweepPoint]:
    """The most that close-call seeds can add before the sweep's points are trained: the candidates of two settings
    of every cell that holds two or more (a cell's settings spend the same FLOPs, so any two cost the same)."""
    cells: dict[tuple, dict[str, list[SweepPoint]]] = {}
    for point in candidates:
        cells.setdefault(cell_key(point), {}).setdefault(point.setting, []).append(point)
    return [point for settings in cells.values() if len(settings) > 1
            for seeds in list(settings.values())[:2] for point in seeds]
