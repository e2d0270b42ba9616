"""What a launch of `arflow train` will do, found before anything is written: the run folder, the checkpoint it
continues from, the resolved config (VAE, distillation teacher), the data it trains on, and every check that can
fail early. `train.driver.train` runs on this plan; `arflow train --dry-run` prints it and stops.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlparse

import torch

from arflow_scale.checkpoint import CheckpointRecord, latest_checkpoint, pin_teacher, read_config, read_record, run_task
from arflow_scale.config import Config
from arflow_scale.data import write_shards
from arflow_scale.data.run_vae import resolve_run_vae
from arflow_scale.data.storage import filesystem, is_local_url, local_path, s3_endpoint
from arflow_scale.schema import check, fail
from arflow_scale.tasks import ModelTask, task_for
from arflow_scale.tracking import recordable_uri, resolve_tracking_uri

from .batching import plan_batches
from .mfu import FlopsMeter
from .preflight import DataPlan, check_data
from .schedule import schedule_jump

log = logging.getLogger(__name__)


def run_folder_url(storage_path: str, name: str) -> str:
    """URL of the run folder (absolute path for local storage)."""
    if is_local_url(storage_path):
        return str(local_path(storage_path) / name)
    return f"{storage_path.rstrip('/')}/{name}"


def worker_storage_options(storage_path: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """fsspec options the workers use for the run folder (the S3 endpoint made explicit)."""
    options = dict(storage_options)
    if urlparse(storage_path).scheme in ("s3", "s3a") and s3_endpoint(options):
        options.setdefault("endpoint_url", s3_endpoint(options))
    return options


def shards_to_prepare(cfg: Config) -> bool:
    """Whether `run.prepare_data` will write shards to `data.manifest` (set, and no manifest there yet)."""
    if not (cfg.run.prepare_data and cfg.data.manifest):
        return False
    fs, path = filesystem(cfg.data.manifest, cfg.data.storage_options)
    folder = path.rstrip("/")
    return not (fs.exists(f"{folder}/manifest.json") or (folder.endswith(".json") and fs.exists(folder)))


def prepare_inputs(cfg: Config, write: bool = True) -> Config:
    """Make local data paths absolute (workers run elsewhere) and, with `write`, write the `run.prepare_data`
    shards to `data.manifest` when it is missing; returns the updated Config."""
    manifest = cfg.data.manifest
    if manifest and is_local_url(manifest):
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=str(local_path(manifest))))
    if write and shards_to_prepare(cfg):
        log.info("writing %s shards to %s", cfg.run.prepare_data, cfg.data.manifest)
        write_shards(cfg.run.prepare_data, cfg.data.manifest, image_size=cfg.model.image_size,
                     samples_per_shard=cfg.run.prepare_samples_per_shard,
                     val_per_class=cfg.run.prepare_val_per_class,
                     storage_options=dict(cfg.data.storage_options), progress=False)
    return cfg


def model_shapes(cfg: Config, storage_options: dict[str, Any]) -> dict[str, list[int]]:
    """{parameter name: shape} of the model a run config trains (a distillation stage: its student), built on the
    meta device: no memory, no init."""
    task = run_task(cfg, storage_options)
    with torch.device("meta"):
        built = task.build_model()
    return {name: list(param.shape) for name, param in built.named_parameters()}


def check_resume(cfg: Config, run_url: str, latest: Optional[CheckpointRecord], where: Optional[str],
                 storage_options: Optional[dict[str, Any]] = None) -> None:
    """Refuse, with a ConfigError naming the key before any worker starts, what cannot continue from the newest
    checkpoint: another model family, ZeRO stage or parameter shape; and a global batch the configured workers
    cannot divide. Another number of workers continues (the state is re-partitioned, `train.reshard`)."""
    for workers in sorted(set(cfg.cluster.worker_range)):  # the fewest and the most workers of a range
        plan_batches(cfg, workers)
    if latest is None:
        return
    again = "resume with the settings it was written with or start a new run.name"
    check(latest.model_family == cfg.model.family, "model.family",
          f"{cfg.model.family!r}, but run {run_url} continues from {where}, a {latest.model_family!r} model; {again}")
    check(latest.zero_stage == cfg.train.zero_stage, "train.zero_stage",
          f"{cfg.train.zero_stage}, but run {run_url} continues from {where}, written at ZeRO stage "
          f"{latest.zero_stage}; resume with train.zero_stage={latest.zero_stage} or start a new run.name")
    options = storage_options or {}
    theirs = latest.param_shapes if latest.param_shapes is not None else model_shapes(
        read_config(where, options), options)
    ours = model_shapes(cfg, options)
    differing = sorted(name for name in set(ours) | set(theirs) if ours.get(name) != theirs.get(name))
    if differing:
        name = differing[0]
        fail("model", f"this config builds parameter {name} with shape {ours.get(name)}, but run {run_url} "
                      f"continues from {where}, where it has shape {theirs.get(name)} ({len(differing)} "
                      f"parameter(s) differ); {again}")


def warn_of_schedule_jump(cfg: Config, resumed: Config, step: int, run_url: str) -> None:
    """A run continued with other schedule settings (a longer `train.steps` under a cosine, another warmup or
    floor) takes the new schedule's factor at once: say so, with both factors, before it trains."""
    jump = schedule_jump(step, (resumed.optim, resumed.train.steps), (cfg.optim, cfg.train.steps))
    if jump is not None:
        log.warning("run %s continues from step %d under other schedule settings (train.steps %d -> %d, "
                    "optim.schedule %s): %s", run_url, step, resumed.train.steps, cfg.train.steps, cfg.optim.schedule,
                    jump)


@dataclass(frozen=True)
class LaunchPlan:
    """A checked launch: `config` resolved (local paths absolute, VAE and teacher pinned), the run folder and the
    storage options its workers use, the data found (None without a shard stream, or before `run.prepare_data`
    wrote it), and the newest checkpoint with its record and config (None for a new run)."""

    config: Config
    run_url: str
    storage_options: dict[str, Any]
    data: Optional[DataPlan]
    latest_url: Optional[str]
    latest: Optional[CheckpointRecord]
    resumed: Optional[Config]

    @property
    def finished(self) -> bool:
        """The run already reached `train.steps` and its last checkpoint holds the final hashes: nothing to train."""
        return self.latest is not None and self.latest.step >= self.config.train.steps and self.latest.hashed

    @property
    def action(self) -> str:
        """What the launch does: "start" (no checkpoint), "resume" (from `latest_url`) or "finished"."""
        return "finished" if self.finished else ("resume" if self.latest is not None else "start")

    @property
    def start_step(self) -> int:
        return self.latest.step if self.latest is not None else 0

    @property
    def steps_to_train(self) -> int:
        return 0 if self.finished else max(self.config.train.steps - self.start_step, 0)

    @functools.cached_property
    def task(self) -> ModelTask:
        """The run's model task (a distillation stage: its student, with the teacher's weights read)."""
        return run_task(self.config, self.storage_options)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step (the same for every number of workers of a range)."""
        return plan_batches(self.config, self.config.cluster.worker_range[1]).global_batch

    @property
    def train_flops_per_step(self) -> float:
        return FlopsMeter.for_training(self.task.forward_flops(), self.global_batch, 1, None).flops_per_step

    @property
    def train_flops_to_go(self) -> float:
        return self.train_flops_per_step * self.steps_to_train

    def summary(self, shards_pending: bool = False) -> dict[str, Any]:
        """What `arflow train --dry-run` prints: what the launch does, its batches and FLOPs, the data and where
        it logs (a password in the MLflow URI masked). `shards_pending`: `run.prepare_data` writes the data first."""
        cfg, task = self.config, self.task
        batches = {str(workers): dataclasses.asdict(plan_batches(cfg, workers))
                   for workers in sorted(set(cfg.cluster.worker_range))}
        uri = resolve_tracking_uri(cfg.tracking.uri, self.run_url, cfg.run.name, create=False) \
            if cfg.tracking.enabled else None
        return {
            "action": self.action, "run_folder": self.run_url, "checkpoint": self.latest_url,
            "from_step": self.start_step, "steps": cfg.train.steps, "steps_to_train": self.steps_to_train,
            "model": {"family": cfg.model.family, "size": cfg.model.size, "params": task.count_parameters(),
                      "images_per_sample": task.images_per_sample, "tokens_per_image": task.tokens_per_image},
            "batches_by_workers": batches, "global_batch": self.global_batch,
            "images_per_step": self.global_batch * task.images_per_sample,
            "train_flops_per_step": self.train_flops_per_step,
            "train_flops_to_go": self.train_flops_to_go,
            "zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision, "compile": cfg.train.compile,
            "data": {"manifest": cfg.data.manifest, "prepare": cfg.run.prepare_data if shards_pending else None,
                     **({"classes_trained": len(self.data.trained),
                         "classes_left_out": [self.data.class_names[c] for c in self.data.left_out]}
                        if self.data is not None else {})},
            "mlflow_tracking_uri": recordable_uri(uri),
        }


def plan_launch(cfg: Config, read_data: bool = True) -> LaunchPlan:
    """Every check that can fail before the run folder is touched, in the order a launch meets them; ConfigError
    names the key. `read_data` False: the run streams no shards of `data.manifest` (a benchmark's batches, or
    shards `run.prepare_data` has yet to write). Reads storage only."""
    check(cfg.eval.fid_every % cfg.checkpoint.every == 0, "eval.fid_every",
          f"{cfg.eval.fid_every} must be a multiple of checkpoint.every={cfg.checkpoint.every}")
    data = check_data(cfg, task_for(cfg.model).images_per_sample) if read_data else None
    run_url = run_folder_url(cfg.run.storage_path, cfg.run.name)
    options = worker_storage_options(cfg.run.storage_path, cfg.run.storage_options)
    latest_url = latest_checkpoint(run_url, options)
    latest = read_record(latest_url, options) if latest_url else None
    resumed = read_config(latest_url, options) if latest_url else None
    cfg = resolve_run_vae(cfg, resumed.model if resumed else None, read_shards=read_data)
    cfg = pin_teacher(cfg, options, resumed)  # a distillation stage: its teacher, fixed for the whole run
    check_resume(cfg, run_url, latest, latest_url, options)
    if latest is not None and resumed is not None and latest.step < cfg.train.steps:
        warn_of_schedule_jump(cfg, resumed, latest.step, run_url)
    return LaunchPlan(cfg, run_url, options, data, latest_url, latest, resumed)
