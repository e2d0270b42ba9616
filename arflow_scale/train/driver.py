"""The Ray Train driver: plan and check the launch before anything starts (launch_plan.py), hold the run lock,
connect to Ray, run the workers, return the typed result (`arflow train` prints it as its last JSON line).

Storage: `run.storage_path` is any URL. Local paths and file:// go to Ray as absolute paths; s3:// goes
through a pyarrow S3FileSystem (endpoint from `run.storage_options.endpoint_url` or AWS_ENDPOINT_URL);
other fsspec protocols through pyarrow's FSSpecHandler. The run folder is `<storage_path>/<run.name>`;
launching again with the same name continues from its newest complete checkpoint, on any number of workers
(the workers find it themselves, `train.checkpointer`; Ray Train registers no checkpoints).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urlparse

import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem, S3FileSystem
from ray.train import FailureConfig, RunConfig, ScalingConfig

from arflow_scale.checkpoint import CheckpointRecord, latest_checkpoint
from arflow_scale.cluster.connect import cluster_has_gpus, ray_session
from arflow_scale.config import Config
from arflow_scale.data.storage import filesystem, is_local_url, local_path, s3_endpoint, with_retries
from arflow_scale.eval.scheduler import FidScheduler
from arflow_scale.tracking import (TrackingTarget, prepare_run, read_run_id, recordable_uri, resolve_tracking_uri,
                                   set_run_status)

from .args import StreamFactory, WorkerArgs
from .result import RestoredState, TrainingStopped, WorkerResult
from .console import Console, Notice
from .nonfinite import NonFiniteError
from .launch_plan import plan_launch, prepare_inputs
from .preflight import DataPlan
from .ray_trainer import LeanTorchTrainer
from .run_lock import RunLock
from .stop import StopSignals
from .worker import train_loop_per_worker

log = logging.getLogger(__name__)

# Environment forwarded to the workers through the object store (never written to storage or logs).
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR",
                 "MLFLOW_DISABLE_TELEMETRY")
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered


@dataclass
class TrainResult:
    """The outcome of `train` (`arflow train`'s last stdout line is `to_json()`)."""

    final_step: int
    final_loss: Optional[float]
    params_sha256: Optional[str]
    ema_sha256: Optional[str]
    checkpoint: Optional[str]
    mlflow_run_id: Optional[str]
    mlflow_tracking_uri: Optional[str]
    images_per_s: float
    fid: dict[str, Any] = field(default_factory=dict)  # step -> {"fid", "n", "seconds"} or {"error"}
    val_loss: Optional[float] = None  # held-out validation loss of the final raw weights, when measured
    val_loss_ema: Optional[float] = None  # ... of the final EMA weights
    classes_trained: Optional[int] = None  # classes of the manifest the run draws from (None: no shard stream)
    restored: Optional[RestoredState] = None  # the latest restore of this launch, hashed (checkpoint.hash_restored)

    def to_json(self) -> dict[str, Any]:
        """A strict-JSON dict (a non-finite number becomes null); `fid`, `val_loss*`, `classes_trained` and
        `restored` only when known."""
        data = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                for key, value in dataclasses.asdict(self).items()}
        for key in ("fid", "val_loss", "val_loss_ema", "classes_trained", "restored"):
            if getattr(self, key) in (None, {}):
                del data[key]
        return data


def ray_storage(storage_path: str, storage_options: dict[str, Any]):
    """(storage_path for RunConfig, pyarrow filesystem or None) for any storage URL."""
    if is_local_url(storage_path):
        return str(local_path(storage_path)), None
    parsed = urlparse(storage_path)
    if parsed.scheme in ("s3", "s3a"):
        kwargs: dict[str, Any] = {}
        endpoint = s3_endpoint(storage_options)
        if endpoint:
            ep = urlparse(endpoint)
            kwargs.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "https")
        # Explicit credentials travel with the filesystem object to Ray's controller actor (whose
        # process may not share the driver's environment); without any, pyarrow's default chain applies.
        key = storage_options.get("key") or os.environ.get("AWS_ACCESS_KEY_ID")
        secret = storage_options.get("secret") or os.environ.get("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            kwargs.update(access_key=key, secret_key=secret,
                          session_token=storage_options.get("token") or os.environ.get("AWS_SESSION_TOKEN"))
        region = storage_options.get("region") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return f"{parsed.netloc}{parsed.path}".rstrip("/"), S3FileSystem(**kwargs)
    fs, path = filesystem(storage_path, storage_options)
    return path.rstrip("/"), PyFileSystem(FSSpecHandler(fs))


def drop_ray_snapshot(run_url: str, storage_options: dict[str, Any]) -> None:
    """Remove Ray Train's snapshot of the checkpoints it registered from the run folder: Ray no longer registers
    ours, and a snapshot left by an earlier version (or half-written during an outage) would fail its start."""
    url = f"{run_url.rstrip('/')}/{RAY_SNAPSHOT}"
    fs, path = filesystem(url, storage_options)
    if with_retries(lambda: fs.exists(path), url, what="list"):
        log.info("removing Ray Train's checkpoint snapshot %s (the run's checkpoints are found in its folder)", url)
        with_retries(lambda: fs.rm(path), url, what="delete")


def train(cfg: Config, address: Optional[str] = None, *, stream_factory: Optional[StreamFactory] = None,
          verbose: bool = False) -> TrainResult:
    """Run training for `cfg` on Ray (joining `address`, else starting a local Ray for the run). Everything that
    can be checked is checked before the run folder is touched; then the run lock is held for the run."""
    plan = plan_launch(cfg if stream_factory is not None else prepare_inputs(cfg), read_data=stream_factory is None)
    cfg, run_url, options, latest = plan.config, plan.run_url, plan.storage_options, plan.latest
    with RunLock(run_url, options, heartbeat_seconds=cfg.run.lock_heartbeat_seconds,
                 missed_heartbeats=cfg.run.lock_missed_heartbeats):
        if plan.finished:
            return finished_result(cfg, run_url, options, plan.latest_url, latest, plan.data)
        with ray_session(address or cfg.cluster.address, cfg.cluster.local_num_cpus, verbose=verbose):
            drop_ray_snapshot(run_url, options)
            return _fit(cfg, run_url, options, latest, stream_factory, plan.data)


def finished_result(cfg: Config, run_url: str, options: dict[str, Any], checkpoint: str, record: CheckpointRecord,
                    data: Optional[DataPlan]) -> TrainResult:
    """A finished run launched again: its final state from the record of its last checkpoint, with no Ray and no
    workers (nothing is trained, and no FID is evaluated again: `arflow fid model` does that). Its MLflow run is
    marked FINISHED, in case the driver that trained it ended before it could."""
    log.info("run %s finished at step %d: reporting its checkpoint %s (nothing to train)", run_url, record.step,
             checkpoint)
    uri = resolve_tracking_uri(cfg.tracking.uri, run_url, cfg.run.name) if cfg.tracking.enabled else None
    tracking = TrackingTarget(uri, read_run_id(run_url, options, record) if uri else None)
    set_run_status(tracking, "FINISHED")
    restored = RestoredState(record.step, record.params_sha256, record.ema_sha256) \
        if cfg.checkpoint.hash_restored else None
    final_loss = record.last_loss if record.last_loss is not None else math.nan  # as the worker reports it
    outcome = WorkerResult(final_step=record.step, final_loss=final_loss, params_sha256=record.params_sha256,
                           ema_sha256=record.ema_sha256, val_loss=record.val_loss, val_loss_ema=record.val_loss_ema,
                           restored=restored)  # as rank 0 would have returned it, with nothing trained
    return dataclasses.replace(_result(outcome, checkpoint, tracking, {}),
                               classes_trained=len(data.trained) if data else None)


def _fit(cfg: Config, run_url: str, options: dict[str, Any], latest: Optional[CheckpointRecord],
         stream_factory: Optional[StreamFactory], data: Optional[DataPlan]) -> TrainResult:
    use_gpu = cfg.cluster.use_gpu if cfg.cluster.use_gpu is not None else cluster_has_gpus()
    tracking = prepare_run(cfg, run_url, world_size=cfg.cluster.num_workers, device="cuda" if use_gpu else "cpu",
                           storage_options=options, latest=latest, extra_params=data.params() if data else None)
    console = Console()
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    args = WorkerArgs(config=cfg, run_url=run_url, storage_options=options, tracking=tracking,
                      env_ref=ray.put(env), console_sink=console.sink, stream_factory=stream_factory)
    trainer = _trainer(cfg, args, use_gpu)
    fid = FidScheduler(cfg, run_url, options, tracking.uri, tracking.run_id)
    signals = StopSignals()
    try:
        with signals.installed():
            result = fid.run_while_polling(trainer.fit, on_tick=lambda: _tick(console, signals))
    except BaseException as err:
        console.close()
        stopped = isinstance(err, KeyboardInterrupt)
        set_run_status(tracking, "KILLED" if stopped else "FAILED")
        if stopped and signals.received is not None:
            raise TrainingStopped(signals.received, None, latest_checkpoint(run_url, options)) from None
        raise
    outcome: Optional[WorkerResult] = result.return_value
    if outcome is None or outcome.error or outcome.stopped:
        console.close()
        set_run_status(tracking, "KILLED" if outcome is not None and outcome.stopped else "FAILED")
        if outcome is None:
            raise RuntimeError(f"training of {run_url} ended without rank 0's result")
        if outcome.stopped:
            raise TrainingStopped(signals.received or signal.SIGINT, outcome.final_step,
                                  latest_checkpoint(run_url, options))
        raise NonFiniteError(outcome.error)
    final_checkpoint = latest_checkpoint(run_url, options)
    fid_results = fid.finish(final_checkpoint)
    for step, entry in fid_results.items():
        console.write(Notice(_fid_line(step, entry)).text)
    console.close()
    return dataclasses.replace(_result(outcome, final_checkpoint, tracking, fid_results),
                               classes_trained=len(data.trained) if data else None)


def _trainer(cfg: Config, args: WorkerArgs, use_gpu: bool) -> LeanTorchTrainer:
    """Ray Train's trainer of the run: `cluster.*` workers, the run folder as its storage, `run.max_failures`."""
    storage_path, storage_fs = ray_storage(cfg.run.storage_path, cfg.run.storage_options)
    return LeanTorchTrainer(
        train_loop_per_worker, train_loop_config=args.loop_config(),
        scaling_config=ScalingConfig(num_workers=cfg.cluster.scaling_workers, use_gpu=use_gpu,
                                     resources_per_worker=dict(cfg.cluster.resources_per_worker) or None),
        run_config=RunConfig(name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures)))


def _tick(console: Console, signals: StopSignals) -> None:
    """Once a second while the workers train: print their events; pass a stop signal on to them once."""
    console.drain()
    if signals.received is not None and not signals.forwarded:
        console.sink.request_stop.remote()
        signals.forwarded = True
        console.write(f"{signal.Signals(signals.received).name} received: the workers checkpoint their next step "
                      f"and stop; send it again to stop at once")


def _fid_line(step: str, entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"FID at step {step} failed: {entry['error']}"
    return f"FID at step {step}: {entry['fid']:.3f} ({entry['n']} samples)"


def _result(outcome: WorkerResult, checkpoint: Optional[str], tracking: TrackingTarget,
            fid: dict[str, Any]) -> TrainResult:
    return TrainResult(
        final_step=outcome.final_step, final_loss=outcome.final_loss, params_sha256=outcome.params_sha256,
        ema_sha256=outcome.ema_sha256, checkpoint=checkpoint, mlflow_run_id=tracking.run_id,
        mlflow_tracking_uri=recordable_uri(tracking.uri), images_per_s=outcome.images_per_s, fid=fid,
        val_loss=outcome.val_loss, val_loss_ema=outcome.val_loss_ema, restored=outcome.restored)
