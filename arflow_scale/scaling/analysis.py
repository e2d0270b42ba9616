"""The whole scaling analysis of a set of points: single power laws, IsoFLOP profiles and frontier,
the parametric law L(N, D), the held-out prediction check. A part the points cannot support is
skipped with a note saying why, the others still run.

Points of one setting (a sweep's `seeds`: the same configuration under other training seeds) are first averaged into
one point per setting (`mean_of_seeds`). Points that share a size, training FLOPs and tokens (a sweep's grid over
another setting, e.g. `optim.lr`) are then alternatives for one cell: every fit takes the lowest loss of each cell, the
best setting per size. A setting that suits some sizes better than others would otherwise bend the profiles and move
the optima; the best of several seeds instead of their mean would favour the settings tried most often. Where both
the best setting of a cell and its runner-up average seeds, a gap under `SEPARATION` standard errors is a close call
(`close_calls`): the seeds do not say which setting is better, and the report lists it."""
from __future__ import annotations

import dataclasses
import math
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
    close_calls: list["CloseCall"] = field(default_factory=list)  # cells whose best setting the seeds do not separate
    runner_up_isoflop: Optional[IsoFlopAnalysis] = None  # refitted with each close call's runner-up (no intervals)
    close_calls_judged: int = 0  # cells whose best setting and runner-up both average seeds


SEPARATION = 2.0  # standard errors of the difference of two settings' mean losses that separate them


@dataclass(frozen=True)
class CloseCall:
    """One cell's best setting and its runner-up, both means of seeds, closer than SEPARATION standard errors of the
    difference of their means (Welch's: sqrt(s1^2/n1 + s2^2/n2)): more seeds would be needed to rank them."""

    best: ScalingPoint
    runner_up: ScalingPoint

    @property
    def gap(self) -> float:
        return self.runner_up.loss - self.best.loss

    @property
    def standard_error(self) -> float:
        return math.hypot(*(p.loss_std / math.sqrt(p.seeds) for p in (self.best, self.runner_up)))


def cell_key(point) -> tuple:
    """A point's cell: its size, training compute and data (params, flops, tokens to 9 digits); any point with
    those attributes (a ScalingPoint, a sweep's point)."""
    return tuple(None if v is None else float(f"{v:.9g}") for v in (point.params, point.flops, point.tokens))


def mean_of_seeds(points: Sequence[ScalingPoint]) -> list[ScalingPoint]:
    """One point per setting: the points of a non-empty `setting` with the same cell (its seeds) become their mean
    loss (and mean FID when every seed has one), named after the setting, with `seeds` and `loss_std`; in the order
    of each setting's first point. Points without a setting stay as they are."""
    groups: dict[tuple, list[ScalingPoint]] = {}
    for i, point in enumerate(points):
        groups.setdefault((cell_key(point), point.setting) if point.setting else (i,), []).append(point)
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
        cell = cell_key(point)
        if cell not in best or point.loss < points[best[cell]].loss:
            best[cell] = i
    kept = set(best.values())
    return ([p for i, p in enumerate(points) if i in kept], [p for i, p in enumerate(points) if i not in kept])


def close_calls(kept: Sequence[ScalingPoint], beaten: Sequence[ScalingPoint]) -> tuple[list[CloseCall], int]:
    """(the close calls among the cells of `kept`, in its order; how many cells could be judged: their best point
    and the lowest of the `beaten` in their cell both average seeds, so both have a standard deviation)."""
    runner_up: dict[tuple, ScalingPoint] = {}
    for point in beaten:
        cell = cell_key(point)
        if cell not in runner_up or point.loss < runner_up[cell].loss:
            runner_up[cell] = point
    pairs = [CloseCall(best, runner_up[cell_key(best)]) for best in kept if cell_key(best) in runner_up]
    judged = [pair for pair in pairs if pair.best.seeds > 1 and pair.runner_up.seeds > 1]
    return [pair for pair in judged if pair.gap < SEPARATION * pair.standard_error], len(judged)


def _close_call_note(calls: list[CloseCall], judged: int) -> str:
    return (f"in {len(calls)} of {judged} cells the best setting is within {SEPARATION:g} standard errors of the "
            f"runner-up, so the seeds do not rank the two (the fits use the lower mean): "
            f"{', '.join(c.best.name for c in calls)}")


def runner_up_isoflop(points: Sequence[ScalingPoint], calls: Sequence[CloseCall], *,
                      tolerance: float = DEFAULT_BUDGET_TOLERANCE) -> IsoFlopAnalysis:
    """The IsoFLOP fit (no bootstrap) with every close call's runner-up in place of its best: whether the optima
    and the frontier rest on rankings the seeds do not support."""
    swap = {id(c.best): c.runner_up for c in calls}
    return fit_isoflop([swap.get(id(p), p) for p in points], tolerance=tolerance,
                       settings=BootstrapSettings(resamples=0))


def _runner_up_note(isoflop: IsoFlopAnalysis, other: IsoFlopAnalysis) -> str:
    optima = ", ".join(f"{a.budget:.3g}: {a.n_opt.value:.4g} -> {b.n_opt.value:.4g}"
                       for a, b in zip(isoflop.profiles, other.profiles))
    laws = (isoflop.n_opt_law, other.n_opt_law)
    exponent = (f"; N_opt ~ C^{laws[0].b:.3g} -> C^{laws[1].b:.3g}" if None not in laws else "")
    return f"with each close call's runner-up instead: N_opt per budget {optima}{exponent}"


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
    close, judged = close_calls(points, beaten)
    if close:
        notes.append(_close_call_note(close, judged))
    power_laws = fit_scaling_laws(points, confidence=settings.confidence, irreducible=irreducible, notes=notes)
    isoflop = fit_isoflop(points, tolerance=tolerance, settings=settings)
    notes += [f"IsoFLOP: {note}" for note in isoflop.notes]
    other = runner_up_isoflop(points, close, tolerance=tolerance) if close else None
    if other is not None:
        notes.append(f"IsoFLOP: {_runner_up_note(isoflop, other)}")
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
                           prediction=prediction, settings=settings, notes=notes, beaten=beaten,
                           close_calls=close, runner_up_isoflop=other, close_calls_judged=judged)
