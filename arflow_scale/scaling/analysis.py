"""The whole scaling analysis of a set of points: single power laws, IsoFLOP profiles and frontier,
the parametric law L(N, D), the held-out prediction check. A part the points cannot support is
skipped with a note saying why, the others still run."""
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

    points: list[ScalingPoint]
    power_laws: dict[str, PowerLawFit]  # loss_vs_params, loss_vs_flops, fid_vs_flops (t intervals)
    isoflop: IsoFlopAnalysis
    parametric: Optional[ParametricFit]
    prediction: Optional[PredictionCheck]
    settings: BootstrapSettings
    notes: list[str] = field(default_factory=list)


def analyse(points: Sequence[ScalingPoint], *, settings: BootstrapSettings = BootstrapSettings(),
            irreducible: bool = False, tolerance: float = DEFAULT_BUDGET_TOLERANCE) -> ScalingAnalysis:
    """Fit everything the points support; intervals at `settings.confidence`."""
    points = list(points)
    notes: list[str] = []
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
                           prediction=prediction, settings=settings, notes=notes)
