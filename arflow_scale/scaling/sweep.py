"""Scaling sweeps: the points of a sweep file (design.py: an IsoFLOP design, or a grid of model size x
budget x other dotted keys), each a training run (`arflow_scale.train.train`) nested under one MLflow
parent run. Resumable: finished points (result JSON) are skipped, interrupted ones continue from their
checkpoints (same run name).

Layout under `<storage_path>/<name>/`: sweep.json (parent run id), points/<point>.json, runs/<point>/.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import ray
from mlflow.tracking import MlflowClient

from arflow_scale.cluster.connect import ray_session
from arflow_scale.config import Config, ConfigError, load_config
from arflow_scale.schema import apply_overrides, build, field_values, read_yaml_mapping
from arflow_scale.tasks import SampleSettings, task_for
from arflow_scale.train.driver import TrainResult, train
from arflow_scale.train.launch_plan import prepare_inputs

from .close_seeds import close_call_settings
from .design import GpuSpec, SizeSpec, SweepConfig, normalise_budgets
from .finished import finished_points, point_fields
from .points import (METRIC_BUDGET, METRIC_FID, METRIC_FLOPS, METRIC_IMAGES, METRIC_LOSS, METRIC_PARAMS,
                     METRIC_TOKENS, TAG_SETTING)
from .state import absolute_url, ended_status, ensure_parent_run, resolve_tracking_uri, sweep_url, write_json

log = logging.getLogger(__name__)


@dataclass
class SweepPoint:
    """One training run of the sweep, with its resolved config and analytic size/compute/data."""

    name: str
    config: Config
    params: int
    flops_per_step: int
    steps: int
    coords: dict[str, Any]
    budget: Optional[float] = None  # the FLOP budget it spends (isoflop, budget.flops); None for budget.steps
    setting: str = ""  # the name without its seed: the configuration that the sweep's `seeds` repeat

    @property
    def flops(self) -> float:
        return float(self.flops_per_step) * self.steps

    @property
    def images(self) -> int:
        """Training images seen: sequences per step x images per sequence (ARFlow's K) x steps."""
        return sequences_per_step(self.config) * task_for(self.config.model).images_per_sample * self.steps

    @property
    def tokens(self) -> int:
        """Training tokens seen: images x tokens per image (patches)."""

        return self.images * task_for(self.config.model).tokens_per_image


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[SweepConfig, Path]:
    """Read a sweep YAML, apply dotted overrides (e.g. `budget.steps=[2,4]`), validate -> (sweep, folder)."""
    path = Path(path)
    data = read_yaml_mapping(path, "sweep file")
    try:
        return build(SweepConfig, normalise_budgets(apply_overrides(data, list(overrides)))), path.parent
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def sequences_per_step(cfg: Config) -> int:
    """Sequences of one optimizer step: batch per rank x ranks x gradient accumulation."""
    return cfg.data.batch_size * cfg.cluster.fixed_workers * cfg.train.grad_accum


def flops_per_step(cfg: Config) -> int:
    """Training FLOPs of one optimizer step: 3 x forward FLOPs x sequences per step."""

    return 3 * int(task_for(cfg.model).forward_flops()) * sequences_per_step(cfg)


def eval_flops(cfg: Config, steps: int) -> float:
    """FID sampling FLOPs of a run of `steps` steps: evaluations x samples x the family's FLOPs of drawing one
    image (ARFlow: a forward pass of one image per sampler step, CFG doubling the batch). Inception
    features are left out: one forward per sample, small beside the sampler's hundreds of model calls."""

    runs = (steps // cfg.eval.fid_every if cfg.eval.fid_every else 0) + int(cfg.eval.fid_at_end)
    ev = cfg.eval
    settings = SampleSettings(sampler=ev.sampler, steps=ev.steps, cfg_scale=ev.cfg_scale, temperature=ev.temperature)
    return float(runs) * ev.num_samples * task_for(cfg.model).sample_flops(settings)


def _slug(value: Any) -> str:
    text = f"{value:g}".replace("+", "") if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def _as_configured(cfg: Config, values: dict[str, Any]) -> dict[str, Any]:
    """Grid values as the config holds them (YAML reads `1e-4` as a string, the config as 0.0001), so that a
    point's name, coordinates and record do not depend on how a number was written."""
    fields = field_values(cfg)
    return {key: fields.get(key, value) for key, value in values.items()}


def _plan(sweep: SweepConfig) -> list[tuple[SizeSpec, str, float]]:
    """(size, budget kind, amount) of every point before the grid keys, in the design's order."""
    if sweep.design == "isoflop":
        return [(size, "flops", level.flops) for level in sweep.budget_levels() for size in level.sizes]
    budgets = [("steps", s) for s in sweep.budget.steps] + [("flops", f) for f in sweep.budget.flops]
    return [(size, kind, amount) for size in sweep.sizes for kind, amount in budgets]


def _base_config(sweep: SweepConfig, folder: Path) -> Optional[Path]:
    if not sweep.base:
        return None
    base = next((c for c in (folder / sweep.base, Path(sweep.base)) if c.is_file()), None)
    if base is None:
        raise ConfigError(f"base: training config {sweep.base!r} not found (looked in {folder} and the cwd)")
    return base


def _point(sweep: SweepConfig, base: Optional[Path], size: SizeSpec, kind: str, amount: float,
           extra: dict[str, Any], seed: Optional[int] = None) -> SweepPoint:
    """One point: the size's config, its steps (a FLOP budget divided by the FLOPs of one step), its run; with a
    seed, its `train.seed` and a `-seed<n>` suffix on the name of its setting."""

    seeded = {} if seed is None else {"train.seed": seed}
    shape = [_override(key, value) for key, value in size.overrides().items()]
    keys = [*sweep.overrides, *shape, *(_override(k, v) for k, v in {**extra, **seeded}.items())]
    cfg = load_config(base, keys)
    extra = _as_configured(cfg, extra)
    per_step = flops_per_step(cfg)
    steps = int(amount) if kind == "steps" else max(1, round(amount / per_step))
    setting = "-".join([sweep.name, size.label, f"{kind[0]}{_slug(amount)}",
                        *(f"{k.rsplit('.', 1)[-1]}{_slug(v)}" for k, v in extra.items())])
    if len(setting) > 200:
        setting = f"{setting[:180]}-{hashlib.sha256(setting.encode()).hexdigest()[:12]}"
    name = setting if seed is None else f"{setting}-seed{seed}"
    run_overrides = [_override("train.steps", steps), _override("run.name", name),
                     _override("run.storage_path", f"{sweep_url(sweep)}/runs"),
                     _override("tracking.experiment", sweep.experiment)]
    if sweep.storage_options:
        run_overrides.append(_override("run.storage_options", sweep.storage_options))
    if sweep.fid:
        run_overrides.append(_override("eval.fid_at_end", True))
    if cfg.data.manifest and "://" not in cfg.data.manifest:
        run_overrides.append(_override("data.manifest", absolute_url(cfg.data.manifest)))
    cfg = load_config(base, [*keys, *run_overrides])
    return SweepPoint(name=name, config=cfg, params=int(task_for(cfg.model).count_parameters()),
                      flops_per_step=per_step, steps=steps, coords={**size.coords(), kind: amount, **extra, **seeded},
                      budget=float(amount) if kind == "flops" else None, setting=setting)


def expand(sweep: SweepConfig, folder: Path = Path(".")) -> list[SweepPoint]:
    """The sweep's points: grid: sizes x budgets x other keys; isoflop: budgets x their sizes x other keys; each
    once per seed of `seeds`, the seeds of one setting next to each other."""
    base = _base_config(sweep, folder)
    keys = sorted(sweep.grid)
    points = [_point(sweep, base, size, kind, amount, dict(zip(keys, values)), seed)
              for (size, kind, amount), values, seed in itertools.product(
                  _plan(sweep), itertools.product(*(sweep.grid[k] for k in keys)), sweep.seeds or [None])]
    names = [p.name for p in points]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"sweep gives two points named {duplicate!r}: make the sizes, budgets and grid values "
                          "distinct")
    return points


def close_call_candidates(sweep: SweepConfig, folder: Path = Path(".")) -> list[SweepPoint]:
    """Every setting's points under the sweep's `close_call_seeds` (none without them): what close calls choose from."""
    if not sweep.close_call_seeds:
        return []
    return expand(dataclasses.replace(sweep, seeds=list(sweep.close_call_seeds)), folder)


def planned_close_call_points(sweep: SweepConfig, folder: Path, records: list[dict]) -> list[SweepPoint]:
    """The points `close_call_seeds` adds, given the records of all of the sweep's own points (close_seeds.py)."""
    settings = set(close_call_settings(records)) if sweep.close_call_seeds else set()
    if not settings:
        return []
    return [point for point in close_call_candidates(sweep, folder) if point.setting in settings]


@dataclass(frozen=True)
class SweepCost:
    """What a sweep spends: training FLOPs, FID sampling FLOPs, data; GPU-hours when a GPU is assumed."""

    points: int
    train_flops: float
    eval_flops: float
    tokens: float
    images: float
    gpu: Optional[GpuSpec] = None

    @property
    def gpu_hours(self) -> Optional[float]:
        return None if self.gpu is None else self.gpu.hours(self.train_flops + self.eval_flops)

    def to_dict(self) -> dict:
        out = {"points": self.points, "train_flops": self.train_flops, "eval_flops": self.eval_flops,
               "tokens": self.tokens, "images": self.images}
        if self.gpu is not None:
            out.update(gpu_hours=self.gpu_hours, train_gpu_hours=self.gpu.hours(self.train_flops),
                       eval_gpu_hours=self.gpu.hours(self.eval_flops),
                       assumptions={"gpu": self.gpu.name, "peak_tflops": self.gpu.peak_tflops, "mfu": self.gpu.mfu})
        return out


def sweep_cost(points: list[SweepPoint], gpu: Optional[GpuSpec] = None) -> SweepCost:
    """Totals over the points (FLOPs as counted by `forward_flops`: matmuls, 2 per multiply-add)."""
    return SweepCost(points=len(points), train_flops=sum(p.flops for p in points),
                     eval_flops=sum(eval_flops(p.config, p.steps) for p in points),
                     tokens=float(sum(p.tokens for p in points)), images=float(sum(p.images for p in points)),
                     gpu=gpu)


# --- running -------------------------------------------------------------------------------------

def _with_tracking(point: SweepPoint, tracking_uri: str, parent_run_id: str) -> Config:
    """The point's config with the sweep's tracking store, its run nested under the parent run."""
    tracking = dataclasses.replace(point.config.tracking, uri=tracking_uri, parent_run_id=parent_run_id)
    return dataclasses.replace(point.config, tracking=tracking)


def _smoothed_loss(client, run_id: str, steps: int, fallback: float) -> float:
    """Mean logged `loss` over the last 20% of the steps (one batch's loss is noisy); else `fallback`."""
    history = [m for m in client.get_metric_history(run_id, "loss") if m.step > 0.8 * steps]
    values = [m.value for m in history if math.isfinite(m.value)]
    return float(sum(values) / len(values)) if values else fallback


def _held_out_loss(result: TrainResult) -> Optional[float]:
    """The run's held-out validation loss when the trainer measured one (`val_loss`), else None."""
    value = result.val_loss
    return float(value) if value is not None and math.isfinite(float(value)) else None


def run_point(point: SweepPoint, *, tracking_uri: str, parent_run_id: str, result_url: str,
              storage_options: dict) -> dict:
    """Train one point (resuming its checkpoints), nest its run under the parent, record the result JSON.

    The point's loss is the run's held-out `val_loss` when the trainer reports one, else the mean
    training loss over its last 20% of steps (`loss_source` says which).
    """

    cfg = _with_tracking(point, tracking_uri, parent_run_id)
    log.info("sweep point %s: %d params, %d steps, %.3g FLOPs", point.name, point.params, point.steps, point.flops)
    result = train(cfg)
    val_loss = _held_out_loss(result)
    loss, fid, run_id = result.final_loss, None, result.mlflow_run_id
    if run_id and cfg.tracking.enabled:

        client = MlflowClient(tracking_uri=tracking_uri)
        loss = val_loss if val_loss is not None else _smoothed_loss(client, run_id, point.steps, loss)
        fid = client.get_run(run_id).data.metrics.get(METRIC_FID)
        client.set_tag(run_id, "arflow.sweep_point", point.name)
        client.set_tag(run_id, TAG_SETTING, point.setting)
        metrics = [(METRIC_PARAMS, point.params), (METRIC_FLOPS, point.flops), (METRIC_LOSS, loss),
                   (METRIC_TOKENS, point.tokens), (METRIC_IMAGES, point.images)]
        if point.budget is not None:
            metrics.append((METRIC_BUDGET, point.budget))
        for key, value in metrics:
            client.log_metric(run_id, key, float(value), step=point.steps)
    elif val_loss is not None:
        loss = val_loss
    record = {"name": point.name, "params": point.params, "flops": point.flops, "steps": point.steps,
              "flops_per_step": point.flops_per_step, "tokens": point.tokens, "images": point.images,
              "budget": point.budget, "setting": point.setting, "loss": loss,
              "loss_source": "val_loss" if val_loss is not None else "train_loss_last_20pct",
              "final_loss": result.final_loss, "fid": fid, "run_id": run_id, "coords": point.coords,
              "checkpoint": result.checkpoint}
    write_json(result_url, {**record, "config": point_fields(point.config)}, storage_options)
    return record


def auto_parallel(point: SweepPoint) -> int:
    """Points the connected cluster fits at once: its CPUs (GPUs) over one point's workers' needs."""

    total = ray.cluster_resources()
    cluster = point.config.cluster
    per_worker = dict(cluster.resources_per_worker)
    use_gpu = cluster.use_gpu if cluster.use_gpu is not None else total.get("GPU", 0) > 0
    kind = "GPU" if use_gpu else "CPU"
    need = cluster.worker_range[1] * per_worker.get(kind, 1.0)
    return max(1, int(total.get(kind, 0) // need))


def run_sweep(sweep: SweepConfig, folder: Path = Path("."), *, parallel: Optional[int] = None,
              budgets: Optional[list[float]] = None) -> dict:
    """Run every unfinished point (of `budgets` only, when given: `SweepConfig.only_budgets`), then the points that
    `close_call_seeds` adds once the sweep's own are finished; returns {"parent_run_id", "tracking_uri", "points":
    [...], "skipped", "ran", "close_call_seeds"}.

    parallel 1 trains in this process one point after the other; more launches each point as a Ray
    task (num_cpus=0: it only drives; the point's training workers hold the CPUs/GPUs) with at most
    that many in flight; 0 sizes it to the cluster. Either way the points share one Ray (`points_session`).
    The parent run is the whole sweep's, whichever budgets run first.
    """
    narrowed = sweep if budgets is None else sweep.only_budgets(budgets)
    points = expand(narrowed, folder)
    tracking_uri = resolve_tracking_uri(sweep)
    parent_run_id = ensure_parent_run(sweep, tracking_uri)
    root = sweep_url(sweep)
    records, todo = finished_points(points, root, sweep.storage_options, f"sweep {sweep.name}")
    log.info("sweep %s: %d points, %d finished, %d to run", sweep.name, len(points), len(records), len(todo))
    kwargs = {"tracking_uri": tracking_uri, "parent_run_id": parent_run_id,
              "storage_options": dict(sweep.storage_options)}
    parallel = sweep.parallel if parallel is None else parallel
    try:
        records.update(_train_points(todo, parallel, root, kwargs))
        extra = planned_close_call_points(narrowed, folder, [records[p.name] for p in points])
        extra_records, extra_todo = finished_points(extra, root, sweep.storage_options, f"sweep {sweep.name}")
        if extra:
            log.info("sweep %s: close_call_seeds %s for %d settings in close calls: %d points, %d to run", sweep.name,
                     sweep.close_call_seeds, len({p.setting for p in extra}), len(extra), len(extra_todo))
        records.update(extra_records)
        records.update(_train_points(extra_todo, parallel, root, kwargs))
    except BaseException as err:
        MlflowClient(tracking_uri=tracking_uri).set_terminated(parent_run_id, status=ended_status(err))
        raise
    MlflowClient(tracking_uri=tracking_uri).set_terminated(parent_run_id, status="FINISHED")
    ran = {p.name for p in (*todo, *extra_todo)}
    every = [*points, *extra]
    return {"sweep": sweep.name, "parent_run_id": parent_run_id, "tracking_uri": tracking_uri,
            "experiment": sweep.experiment, "ran": [p.name for p in every if p.name in ran],
            "skipped": [p.name for p in every if p.name not in ran],
            "points": [records[p.name] for p in every],
            "close_call_seeds": {"seeds": list(sweep.close_call_seeds),
                                 "settings": list(dict.fromkeys(p.setting for p in extra)),
                                 "points": [p.name for p in extra]}}


def _train_points(todo: list[SweepPoint], parallel: int, root: str, kwargs: dict) -> dict[str, dict]:
    """Train `todo` on one Ray (none when empty), after writing the shards they would each write (run.prepare_data)."""
    if not todo:
        return {}
    prepare_inputs(todo[0].config)
    with points_session(todo):
        return run_points(todo, parallel, root, kwargs)


def points_session(points: list[SweepPoint], *, dashboard: bool = True):
    """One Ray connection for the work on `points` (the first one's `cluster.address`, else a local Ray for the
    duration): every point's training joins it instead of starting and stopping a Ray of its own. No Ray when
    `points` is empty; `dashboard` False when nothing trains (Ray Train's controller polls the dashboard)."""
    if not points:
        return contextlib.nullcontext()
    cluster = points[0].config.cluster
    return ray_session(cluster.address, cluster.local_num_cpus, dashboard=dashboard)


def run_points(todo: list[SweepPoint], parallel: int, root: str, kwargs: dict) -> dict[str, dict]:
    """Train `todo` one after the other in this process (parallel 1), else as Ray tasks, `parallel` at a time
    (0: as many as the connected cluster fits); -> records by point name."""
    if not todo:
        return {}
    if parallel == 1:
        return {point.name: run_point(point, result_url=f"{root}/points/{point.name}.json", **kwargs)
                for point in todo}
    return run_points_parallel(todo, parallel or auto_parallel(todo[0]), root, kwargs)


def run_points_parallel(todo: list[SweepPoint], parallel: int, root: str, kwargs: dict) -> dict[str, dict]:
    """Ray tasks, at most `parallel` in flight; a failed point fails the sweep after the others finish."""

    task = ray.remote(num_cpus=0, max_retries=0)(run_point)
    pending: dict[Any, str] = {}
    records: dict[str, dict] = {}
    errors: list[str] = []
    queue = list(todo)
    log.info("running %d points, %d at a time, as Ray tasks", len(todo), parallel)
    while queue or pending:
        while queue and len(pending) < parallel:
            point = queue.pop(0)
            pending[task.remote(point, result_url=f"{root}/points/{point.name}.json", **kwargs)] = point.name
        done, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(done[0])
        try:
            records[name] = ray.get(done[0])
        except Exception as err:  # noqa: BLE001 - collected: the other points keep running
            errors.append(f"{name}: {err}")
    if errors:
        raise RuntimeError(f"{len(errors)} sweep point(s) failed (rerun to resume them): " + "; ".join(errors))
    return records
