"""The whole scaling analysis of a set of points: single power laws, IsoFLOP profiles and frontier,
the parametric law L(N, D), the held-out prediction check. A part the points cannot support is
skipped with a note saying why, the others still run.

Points of one setting (a sweep's `seeds`: the same configuration under other training seeds) are first averaged into
one point per setting (`mean_of_seeds`). Points that share a size, training FLOPs and tokens (a sweep's grid over
another setting, e.g. `optim.lr`) are then alternatives for one cell: every fit takes the lowest loss of each cell, the
best setting per size. A setting that suits some sizes better than others would otherwise bend the profiles and move
the optima; the best of several seeds instead of their mean would favour the settings tried most often."""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .bootstrap import BootstrapSettings
from .fit import PowerLawFit, fit_scaling_laws
from .holdout import PredictionCheck, prediction_check
from .isoflop import DEFAULT_BUDGET_TOLERANCE, IsoFlopAnalysis, fit_isoflop
from .parametric import ParametricFit, fit_parametric, parametric_skip_reason
from .points import ScalingPoint


@dataclass
class ScalingAnalysis:
    """Every fit of one set of points; None for a part that was skipped (see notes)."""

    points: list[ScalingPoint]  # the points every fit used: seeds averaged, the best of each cell
    power_laws: dict[str, PowerLawFit]  # loss_vs_params, loss_vs_flops, fid_vs_flops (t intervals)
    isoflop: IsoFlopAnalysis
    parametric: Optional[ParametricFit]
    prediction: Optional[PredictionCheck]
    settings: BootstrapSettings
    notes: list[str] = field(default_factory=list)
    beaten: list[ScalingPoint] = field(default_factory=list)  # a lower loss shares their size, FLOPs and tokens


def _cell(point: ScalingPoint) -> tuple:
    """A point's size, training compute and data (params, flops, tokens to 9 digits)."""
    return tuple(None if v is None else float(f"{v:.9g}") for v in (point.params, point.flops, point.tokens))


def mean_of_seeds(points: Sequence[ScalingPoint]) -> list[ScalingPoint]:
    """One point per setting: the points of a non-empty `setting` with the same cell (its seeds) become their mean
    loss (and mean FID when every seed has one), named after the setting, with `seeds` and `loss_std`; in the order
    of each setting's first point. Points without a setting stay as they are."""
    groups: dict[tuple, list[ScalingPoint]] = {}
    for i, point in enumerate(points):
        groups.setdefault((_cell(point), point.setting) if point.setting else (i,), []).append(point)
    return [group[0] if len(group) == 1 else _mean(group) for group in groups.values()]


def _mean(seeds: list[ScalingPoint]) -> ScalingPoint:
    losses = [p.loss for p in seeds]
    fids = [p.fid for p in seeds]
    return dataclasses.replace(seeds[0], name=seeds[0].setting, run_id=",".join(p.run_id for p in seeds if p.run_id),
                               loss=statistics.fmean(losses), loss_std=statistics.stdev(losses), seeds=len(seeds),
                               fid=None if None in fids else statistics.fmean(fids))


def best_per_cell(points: Sequence[ScalingPoint]) -> tuple[list[ScalingPoint], list[ScalingPoint]]:
    """Split points into (the lowest loss of each cell, the others), both in input order. A cell is one size,
    training compute and data (equal params, flops and tokens to 9 digits): what a grid over another setting
    repeats; points trained longer or on other data are never alternatives."""
    best: dict[tuple, int] = {}
    for i, point in enumerate(points):
        cell = _cell(point)
        if cell not in best or point.loss < points[best[cell]].loss:
            best[cell] = i
    kept = set(best.values())
    return ([p for i, p in enumerate(points) if i in kept], [p for i, p in enumerate(points) if i not in kept])


def analyse(points: Sequence[ScalingPoint], *, settings: BootstrapSettings = BootstrapSettings(),
            irreducible: bool = False, tolerance: float = DEFAULT_BUDGET_TOLERANCE) -> ScalingAnalysis:
    """Fit everything the points support: each setting's seeds averaged (`mean_of_seeds`), then the best point
    of each cell (`best_per_cell`); intervals at `settings.confidence`."""
    runs = len(points)
    points, beaten = best_per_cell(mean_of_seeds(points))
    notes: list[str] = []
    averaged = [p for p in (*points, *beaten) if p.seeds > 1]
    if averaged:
        notes.append(f"{sum(p.seeds for p in averaged)} of {runs} runs are seeds of {len(averaged)} setting(s): "
                     "every fit uses each setting's mean loss")
    if beaten:
        notes.append(f"{len(beaten)} point(s) share their size, FLOPs and tokens with a lower loss (a grid over "
                     f"another setting, e.g. the learning rate): every fit uses the best of each, {len(points)} points")
    power_laws = fit_scaling_laws(points, confidence=settings.confidence, irreducible=irreducible, notes=notes)
    isoflop = fit_isoflop(points, tolerance=tolerance, settings=settings)
    notes += [f"IsoFLOP: {note}" for note in isoflop.notes]
    parametric = None
    reason = parametric_skip_reason(points)
    if reason:
        notes.append(reason)
    else:
        parametric = fit_parametric(points, settings=settings)
    prediction = None
    try:
        prediction = prediction_check(points, tolerance=tolerance)
        notes += [f"prediction check: {note}" for note in prediction.notes]
    except ValueError as err:
        notes.append(str(err))
    return ScalingAnalysis(points=points, power_laws=power_laws, isoflop=isoflop, parametric=parametric,
                           prediction=prediction, settings=settings, notes=notes, beaten=beaten)
