"""Seeds where they decide something: a sweep's `close_call_seeds` trains more seeds of the two settings of every
close call (analysis.close_calls: a cell whose best setting and runner-up are within SEPARATION standard errors)
among the sweep's own finished points, and of no other setting.

Which settings get the seeds is decided by the results of the sweep's own points alone, so a rerun plans the same
points and skips the finished ones. The fits then average every seed of a setting, and the report says whether the
added seeds separate each pair. Candidates are the sweep's points under `close_call_seeds` (sweep.expand of the sweep
with those seeds): anything with `setting`, `params`, `flops` and `tokens`.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence, TypeVar

from .analysis import best_per_cell, close_calls, mean_of_seeds
from .points import point_from_record


class Candidate(Protocol):
    setting: str
    params: int

    @property
    def flops(self) -> float: ...

    @property
    def tokens(self) -> int: ...


PointT = TypeVar("PointT", bound=Candidate)


def close_call_settings(records: Sequence[dict[str, Any]]) -> list[str]:
    """The settings of every close call among finished point records (sweep.run_point's), each call's best setting
    before its runner-up, in the order of the cells."""
    kept, beaten = best_per_cell(mean_of_seeds([point_from_record(record) for record in records]))
    calls, _ = close_calls(kept, beaten)
    return list(dict.fromkeys(setting for call in calls for setting in (call.best.setting, call.runner_up.setting)))


def close_call_points(candidates: Sequence[PointT], records: Sequence[dict[str, Any]]) -> list[PointT]:
    """The candidates of the settings in a close call among `records` (the sweep's own points, all finished)."""
    settings = set(close_call_settings(records))
    return [point for point in candidates if point.setting in settings]


def close_call_bound(candidates: Sequence[PointT]) -> list[PointT]:
    """The most that close-call seeds can add before the sweep's points are trained: the candidates of the two most
    expensive settings of every cell (one size, training FLOPs and data) that holds two or more settings."""
    cells: dict[tuple, dict[str, list[PointT]]] = {}
    for point in candidates:
        cell = tuple(float(f"{value:.9g}") for value in (point.params, point.flops, point.tokens))
        cells.setdefault(cell, {}).setdefault(point.setting, []).append(point)
    bound: list[PointT] = []
    for settings in cells.values():
        if len(settings) > 1:
            costliest = sorted(settings.values(), key=lambda seeds: -sum(p.flops for p in seeds))[:2]
            bound += [point for seeds in costliest for point in seeds]
    return bound
