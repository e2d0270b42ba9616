"""The whole scaling analysis of a set of points: single power laws, IsoFLOP profiles and frontier,
the parametric law L(N, D), the held-out prediction check. A part the points cannot support is
skipped with a note saying why, the others still run.

Points that share a size, training FLOPs and tokens (a sweep's grid over another setting, e.g. `optim.lr`) are
alternatives for one cell: every fit takes the lowest loss of each cell, the best setting per size. A setting that suits
some sizes better than others would otherwise bend the profiles and move the optima."""
from __future__ import annotations

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

    points: list[ScalingPoint]  # the points every fit used: the best of each cell (`best_per_cell`)
    power_laws: dict[str, PowerLawFit]  # loss_vs_params, loss_vs_flops, fid_vs_flops (t intervals)
    isoflop: IsoFlopAnalysis
    parametric: Optional[ParametricFit]
    prediction: Optional[PredictionCheck]
    settings: BootstrapSettings
    notes: list[str] = field(default_factory=list)
    beaten: list[ScalingPoint] = field(default_factory=list)  # a lower loss shares their size, FLOPs and tokens


def best_per_cell(points: Sequence[ScalingPoint]) -> tuple[list[ScalingPoint], list[ScalingPoint]]:
    """Split points into (the lowest loss of each cell, the others), both in input order. A cell is one size,
    training compute and data (equal params, flops and tokens to 9 digits): what a grid over another setting
    repeats; points trained longer or on other data are never alternatives."""
    def key(p: ScalingPoint) -> tuple:
        return tuple(None if v is None else float(f"{v:.9g}") for v in (p.params, p.flops, p.tokens))

    best: dict[tuple, int] = {}
    for i, point in enumerate(points):
        cell = key(point)
        if cell not in best or point.loss < points[best[cell]].loss:
            best[cell] = i
    kept = set(best.values())
    return ([p for i, p in enumerate(points) if i in kept], [p for i, p in enumerate(points) if i not in kept])


def analyse(points: Sequence[ScalingPoint], *, settings: BootstrapSettings = BootstrapSettings(),
            irreducible: bool = False, tolerance: float = DEFAULT_BUDGET_TOLERANCE) -> ScalingAnalysis:
    """Fit everything the points support, the best point of each cell (`best_per_cell`); intervals at
    `settings.confidence`."""
    points, beaten = best_per_cell(list(points))
    notes: list[str] = []
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
