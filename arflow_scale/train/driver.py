"""The Ray Train driver: connect to Ray, describe scaling / storage / failures, run, return the result.

Storage: `run.storage_path` is any URL. Local paths and file:// go to Ray as absolute paths; s3:// goes
through a pyarrow S3FileSystem (endpoint from `run.storage_options.endpoint_url` or AWS_ENDPOINT_URL);
other fsspec protocols through pyarrow's FSSpecHandler. The run folder is `<storage_path>/<run.name>`;
launching again with the same name continues from its latest checkpoint (Ray Train restores it).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from arflow_scale.data.storage import is_local_url, local_path

log = logging.getLogger(__name__)

# Environment forwarded to the workers through the object store (never written to storage or logs).
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR",
                 "MLFLOW_DISABLE_TELEMETRY")


def connect_ray(address: str | None, local_num_cpus: int | None = None) -> None:
    """Join `address` / RAY_ADDRESS, else start a light local Ray (small object store; its dashboard on
    127.0.0.1 also serves the State API that Ray Train's controller watchdog polls)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    temp_dir = Path(os.environ.get("ARFLOW_RAY_TMP", ".ray_tmp")).resolve()
    temp_dir.mkdir(parents=True, exist_ok=True)
    ray.init(address="local", num_cpus=local_num_cpus or os.cpu_count(), include_dashboard=True,
             dashboard_host="127.0.0.1", object_store_memory=256 * 1024 * 1024, _temp_dir=str(temp_dir))


def run_folder_url(storage_path: str, name: str) -> str:
    """URL of the run folder (absolute path for local storage)."""
    if is_local_url(storage_path):
        return str(local_path(storage_path) / name)
    return f"{storage_path.rstrip('/')}/{name}"


def storage_endpoint(storage_options: dict[str, Any]) -> str | None:
    client_kwargs = storage_options.get("client_kwargs") or {}
    return storage_options.get("endpoint_url") or client_kwargs.get("endpoint_url") \
        or os.environ.get("AWS_ENDPOINT_URL")


def ray_storage(storage_path: str, storage_options: dict[str, Any]):
    """(storage_path for RunConfig, pyarrow filesystem or None) for any storage URL."""
    if is_local_url(storage_path):
        return str(local_path(storage_path)), None
    parsed = urlparse(storage_path)
    if parsed.scheme in ("s3", "s3a"):
        from pyarrow.fs import S3FileSystem

        kwargs: dict[str, Any] = {}
        endpoint = storage_endpoint(storage_options)
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
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from arflow_scale.data.storage import filesystem

    fs, path = filesystem(storage_path, storage_options)
    return path.rstrip("/"), PyFileSystem(FSSpecHandler(fs))


def worker_storage_options(storage_path: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """fsspec options the workers use for the run folder (the S3 endpoint made explicit)."""
    options = dict(storage_options)
    if urlparse(storage_path).scheme in ("s3", "s3a") and storage_endpoint(options):
        options.setdefault("endpoint_url", storage_endpoint(options))
    return options


def prepare_inputs(cfg):
    """Make local data paths absolute (workers run elsewhere) and write the `run.prepare_data` shards
    to `data.manifest` when it is missing; returns the updated Config."""
    import dataclasses

    from arflow_scale.data import write_shards
    from arflow_scale.data.storage import filesystem

    manifest = cfg.data.manifest
    if manifest and is_local_url(manifest):
        manifest = str(local_path(manifest))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, manifest=manifest))
    if cfg.run.prepare_data and manifest:
        fs, path = filesystem(manifest, cfg.data.storage_options)
        folder = path.rstrip("/")
        if not (fs.exists(f"{folder}/manifest.json") or (folder.endswith(".json") and fs.exists(folder))):
            log.info("writing %s shards to %s", cfg.run.prepare_data, manifest)
            write_shards(cfg.run.prepare_data, manifest, image_size=cfg.model.image_size,
                         samples_per_shard=cfg.run.prepare_samples_per_shard,
                         storage_options=dict(cfg.data.storage_options), progress=False)
    return cfg


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def train(cfg, address: str | None = None, in_memory_data: bool = False) -> dict[str, Any]:
    """Run training for `cfg` on Ray; returns the final JSON result (see `arflow train`).

    in_memory_data: train on one fixed random batch instead of `data.manifest` (benchmarks).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from arflow_scale.config import to_dict
    from arflow_scale.tracking import prepare_run
    from arflow_scale.train.checkpoint import check_resume_world_size, latest_checkpoint
    from arflow_scale.train.loop import train_loop_per_worker

    cfg = cfg if in_memory_data else prepare_inputs(cfg)
    from arflow_scale.config.base import check

    check(cfg.eval.fid_every % cfg.checkpoint.every == 0, "eval.fid_every",
          f"{cfg.eval.fid_every} must be a multiple of checkpoint.every={cfg.checkpoint.every}")
    run_url = run_folder_url(cfg.run.storage_path, cfg.run.name)
    options = worker_storage_options(cfg.run.storage_path, cfg.run.storage_options)
    check_resume_world_size(run_url, options, cfg.cluster.num_workers)
    connect_ray(address or cfg.cluster.address, cfg.cluster.local_num_cpus)
    use_gpu = cfg.cluster.use_gpu if cfg.cluster.use_gpu is not None else _cluster_has_gpus()
    storage_path, storage_fs = ray_storage(cfg.run.storage_path, cfg.run.storage_options)
    tracking_uri, run_id = prepare_run(cfg, run_url, world_size=cfg.cluster.num_workers,
                                       device="cuda" if use_gpu else "cpu", storage_options=options)
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    resources = dict(cfg.cluster.resources_per_worker) or None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "run_url": run_url, "storage_options": options,
                           "tracking_uri": tracking_uri, "run_id": run_id, "env": ray.put(env),
                           "in_memory_data": in_memory_data},
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last)),
    )
    fid = FidScheduler(cfg, run_url, options, tracking_uri, run_id)
    try:
        result = fid.run_while_polling(trainer.fit)
    except Exception:
        _mark_failed(tracking_uri, run_id)
        raise
    metrics = result.metrics or {}
    fid_results = fid.finish(latest_checkpoint(run_url, options))
    return {
        "final_step": int(metrics.get("final_step", metrics.get("step", 0))),
        "final_loss": float(metrics.get("final_loss", float("nan"))),
        "params_sha256": metrics.get("params_sha256"),
        "ema_sha256": metrics.get("ema_sha256"),
        "checkpoint": latest_checkpoint(run_url, options),
        "mlflow_run_id": run_id,
        "mlflow_tracking_uri": tracking_uri,
        "images_per_s": float(metrics.get("images_per_s", 0.0)),
        **({"fid": fid_results} if fid_results else {}),
    }


class FidScheduler:
    """Driver side FID: launches `launch_fid` for every complete checkpoint at a multiple of
    eval.fid_every while training runs (polling the run folder), and for the final one with
    eval.fid_at_end; the tasks log `fid` to the run. The driver owns the refs, so the tasks outlive the
    training workers, and on a small cluster they run once the workers release their CPUs."""

    def __init__(self, cfg, run_url: str, storage_options: dict, tracking_uri: str | None, run_id: str | None,
                 poll_seconds: float = 10.0):
        self.cfg, self.run_url, self.options = cfg, run_url, storage_options
        self.tracking_uri, self.run_id, self.poll_seconds = tracking_uri, run_id, poll_seconds
        self.refs: dict[int, Any] = {}
        self.failed: dict[int, str] = {}  # step -> why its FID could not be launched

    def _launch(self, checkpoint_url: str, step: int) -> None:
        """Launch the FID of one checkpoint; a failure (say, keep_last deleted it meanwhile) is
        recorded for that step and never stops the training run."""
        from arflow_scale.eval.graph import PinnedEMA, launch_fid

        if step in self.refs or step in self.failed:
            return
        try:
            # the weights are pinned now: keep_last may delete the checkpoint before the tasks run
            loader = PinnedEMA.of(checkpoint_url, self.options)
            self.refs[step] = launch_fid(checkpoint_url, self.cfg, step, self.tracking_uri, self.run_id,
                                         model_loader=loader)
            log.info("FID of %s (step %d) launched", checkpoint_url, step)
        except Exception as err:  # noqa: BLE001 - a FID problem must not fail the training run
            log.warning("FID of %s (step %d) could not be launched: %s", checkpoint_url, step, err)
            self.failed[step] = f"{type(err).__name__}: {err}"

    def _poll(self) -> None:
        from arflow_scale.train.checkpoint import checkpoint_step, is_complete, list_checkpoints

        every = self.cfg.eval.fid_every
        for url in list_checkpoints(self.run_url, self.options):
            step = checkpoint_step(url)
            new = step not in self.refs and step not in self.failed
            if every and step % every == 0 and new and is_complete(url, self.options):
                self._launch(url, step)

    def run_while_polling(self, fit):
        """Run `fit()` (blocking) in a thread; poll for FID checkpoints meanwhile."""
        if not self.cfg.eval.fid_every:
            return fit()
        from concurrent.futures import ThreadPoolExecutor, wait

        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(fit)
            while not wait([future], timeout=self.poll_seconds).done:
                self._poll()
            result = future.result()
        self._poll()
        return result

    def finish(self, final_checkpoint: str | None) -> dict[str, Any]:
        """Launch the end-of-training FID if configured, wait for all; {step: {"fid", "n", "seconds"}}."""
        import ray

        from arflow_scale.train.checkpoint import checkpoint_step

        if self.cfg.eval.fid_at_end and final_checkpoint:
            self._launch(final_checkpoint, checkpoint_step(final_checkpoint))
        results: dict[str, Any] = {str(step): {"error": why} for step, why in self.failed.items()}
        for step, ref in sorted(self.refs.items()):
            try:
                results[str(step)] = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a failed evaluation must not lose a finished run
                log.warning("FID at step %s failed: %s", step, err)
                results[str(step)] = {"error": f"{type(err).__name__}: {err}"}
        return dict(sorted(results.items(), key=lambda item: int(item[0])))


def _mark_failed(tracking_uri: str | None, run_id: str | None) -> None:
    if not (tracking_uri and run_id):
        return
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri).set_terminated(run_id, status="FAILED")
    except Exception as err:  # noqa: BLE001 - never hide the training error behind a tracking one
        log.warning("could not mark MLflow run %s failed: %s", run_id, err)
