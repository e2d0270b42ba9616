"""FID as a Ray task graph: T sampling tasks -> T feature tasks -> one reduce (Frechet distance, MLflow).

Each sampling task loads the EMA weights itself (and, for a latent model, the run's VAE once), draws uniform
class labels and noise from (seed, task index), decodes each batch to pixels on its device and returns uint8
images; each feature task turns one task's images into mergeable Gaussian statistics; the reduce merges
them, compares with the reference statistics and logs `fid`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import ray
import torch
from torch import nn
from tqdm import tqdm

from arflow_scale.checkpoint import load_ema_weights, run_task
from arflow_scale.config import Config, EvalConfig
from arflow_scale.data.storage import filesystem
from arflow_scale.model.decoder import Decoder
from arflow_scale.model.precision import use_tf32
from arflow_scale.schema import build
from arflow_scale.tasks import SampleSettings, task_for

from .frechet import fid_from_stats
from .images import as_uint8_rgb, save_npz
from .inception import feature_stats, load_inception, to_uint8_images
from .stats import GaussianStats

log = logging.getLogger(__name__)

# checkpoint URL, storage options -> (run Config, model with the EMA weights, eval mode)
ModelLoader = Callable[[str, Optional[dict]], tuple[Config, nn.Module]]


def load_ema_model(checkpoint_url: str, storage_options: Optional[dict] = None) -> tuple[Config, nn.Module]:
    """The default loader: the checkpoint's consolidated EMA weights in its family's model."""
    run_cfg, state_dict = load_ema_weights(checkpoint_url, storage_options=storage_options)
    return run_cfg, run_task(run_cfg, storage_options).model_from_weights(state_dict)


class PinnedEMA:
    """A model loader over EMA weights already put in Ray's object store, so the FID of a checkpoint
    survives `checkpoint.keep_last` deleting it before queued tasks start. -> (Config, model)."""

    def __init__(self, weights_ref):
        self.weights_ref = weights_ref  # ObjectRef of CheckpointWeights

    @classmethod
    def of(cls, checkpoint_url: str, storage_options: Optional[dict] = None) -> "PinnedEMA":
        return cls(ray.put(load_ema_weights(checkpoint_url, storage_options=storage_options)))

    def __call__(self, checkpoint_url: str, storage_options: Optional[dict] = None) -> tuple[Config, nn.Module]:
        run_cfg, state_dict = ray.get(self.weights_ref)
        return run_cfg, run_task(run_cfg, storage_options).model_from_weights(state_dict)


@dataclass(frozen=True)
class FidPlan:
    """Everything the graph needs besides the checkpoint: an eval section (the protocol) and the storage
    options of its URLs."""

    eval: EvalConfig
    storage_options: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Config) -> "FidPlan":
        """From a whole Config: its eval section, plus run.storage_options for URLs."""
        if not cfg.eval.ref_stats:
            raise ValueError("eval.ref_stats: reference statistics are required for FID "
                             "(make them with `arflow fid ref --data MANIFEST_URL --out stats.npz`)")
        return cls(cfg.eval, dict(cfg.run.storage_options))

    @classmethod
    def of(cls, storage_options: Optional[dict] = None, **eval_fields: Any) -> "FidPlan":
        """A plan from eval-section fields (validated like the config: a bad value names its key)."""
        return cls(build(EvalConfig, eval_fields, "eval"), dict(storage_options or {}))

    @property
    def sample_settings(self) -> SampleSettings:
        ev = self.eval
        return SampleSettings(sampler=ev.sampler, steps=ev.steps, cfg_scale=ev.cfg_scale,
                              guided_channels=ev.guided_channels, temperature=ev.temperature,
                              compile=ev.compile_sampler)


def split_counts(total: int, parts: int) -> list[int]:
    """`total` items over `parts` tasks, sizes differing by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def task_seed(seed: int, task_index: int) -> int:
    """A 63-bit seed for task `task_index` of a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, task_index]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def sample_images(checkpoint_url: str, task_index: int, count: int, plan: FidPlan,
                  model_loader: ModelLoader = load_ema_model) -> np.ndarray:
    """Task body: `count` samples as uint8 RGB (count, H, W, 3) at the data's pixel resolution (latents
    decoded by the run's VAE), labels uniform, seeded by task index."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_cfg, model = model_loader(checkpoint_url, plan.storage_options or None)
    task = task_for(run_cfg.model)
    use_tf32(run_cfg.train.tf32, device)
    model = model.to(device).eval()
    decoder = Decoder.for_model(run_cfg.model, device)
    generator = torch.Generator().manual_seed(task_seed(plan.eval.seed, task_index))
    labels = torch.randint(task.num_classes, (count,), generator=generator)
    batches, batch_size = [], plan.eval.sample_batch_size
    for start in range(0, count, batch_size):
        images = decoder(task.sample(model, labels[start:start + batch_size], plan.sample_settings, generator))
        if images.shape[1] not in (1, 3):
            raise ValueError(f"{checkpoint_url}: the model makes {images.shape[1]}-channel samples and its run "
                             f"names no VAE to decode them (model.vae); FID needs 1- or 3-channel images")
        batches.append(as_uint8_rgb(to_uint8_images(images.clamp(-1, 1)).numpy(), checkpoint_url))
    return np.concatenate(batches)


def image_stats(images: np.ndarray, inception_path: Optional[str] = None, batch_size: int = 32,
                storage_options: Optional[dict] = None) -> GaussianStats:
    """Task body: Inception feature statistics of uint8 images (N, H, W, C)."""
    extractor = load_inception(inception_path, storage_options=storage_options)
    return feature_stats(extractor, (images[start:start + batch_size] for start in range(0, len(images), batch_size)))


def reduce_fid(ref_stats_url: str, parts: list[GaussianStats], *, step: Optional[int] = None,
               tracking_uri: Optional[str] = None, run_id: Optional[str] = None,
               started: Optional[float] = None, storage_options: Optional[dict] = None) -> dict:
    """Reduce body: merge the parts, FID against the reference, log `fid` at `step` to MLflow run `run_id`."""
    total = GaussianStats.merge_all(list(parts))
    reference = GaussianStats.load(ref_stats_url, storage_options)
    fid = fid_from_stats(total, reference)
    result = {"fid": fid, "n": total.count, "seconds": time.time() - started if started else None}
    if run_id:
        from mlflow.tracking import MlflowClient  # here: the sampling and Inception tasks never need MLflow

        try:
            MlflowClient(tracking_uri=tracking_uri).log_metric(run_id, "fid", fid, step=step or 0)
            result["mlflow_logged"] = True
            log.info("fid %.4f (n=%d) logged to MLflow run %s at step %s", fid, total.count, run_id, step)
        except Exception as err:  # noqa: BLE001 - keep the FID even when tracking is down
            result["mlflow_logged"] = False
            log.warning("fid %.4f (n=%d): logging to MLflow run %s at %s failed: %s", fid, total.count,
                        run_id, tracking_uri, err)
    return result


def _task_options(ev: EvalConfig) -> dict:
    gpus = ev.gpus_per_task
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return {"num_cpus": ev.cpus_per_task, "num_gpus": gpus}


def _reduce_with_parts(ref_stats_url, kwargs, *parts):
    return reduce_fid(ref_stats_url, list(parts), **kwargs)


@dataclass
class FidGraph:
    """Object refs of one launched graph: per-task images and statistics, and the reduce."""

    image_refs: list
    stats_refs: list
    counts: list[int]
    result_ref: Any


def build_graph(checkpoint_url: str, plan: FidPlan, *, step: Optional[int] = None,
                tracking_uri: Optional[str] = None, run_id: Optional[str] = None,
                model_loader: ModelLoader = load_ema_model) -> FidGraph:
    """Submit sampling, feature and reduce tasks (Ray must be initialised); returns at once."""
    ev, options = plan.eval, plan.storage_options or None
    if not ev.ref_stats:
        raise ValueError("eval.ref_stats: reference statistics are required for FID (--ref)")
    fs, path = filesystem(ev.ref_stats, options)
    if not fs.isfile(path):  # fail here, not in the reduce after all the sampling
        raise FileNotFoundError(f"{ev.ref_stats}: reference statistics not found (eval.ref_stats / --ref); "
                                f"make them with `arflow fid ref --data MANIFEST_URL --out stats.npz`")
    started = time.time()
    graph = submit_sampling(checkpoint_url, plan, model_loader=model_loader)
    reduce_task = ray.remote(_reduce_with_parts).options(name="fid-reduce", num_cpus=ev.cpus_per_task)
    kwargs = dict(step=step, tracking_uri=tracking_uri, run_id=run_id, started=started, storage_options=options)
    graph.result_ref = reduce_task.remote(ev.ref_stats, kwargs, *graph.stats_refs)
    return graph


def submit_sampling(checkpoint_url: str, plan: FidPlan, *, model_loader: ModelLoader = load_ema_model) -> FidGraph:
    """Submit the sampling and feature tasks only (no reduce, no reference needed): the caller merges the
    per-task statistics itself, e.g. to pool several seeds' samples. Returns at once (`result_ref` None)."""
    ev, options = plan.eval, plan.storage_options or None
    task_options = _task_options(ev)
    sampler_task = ray.remote(sample_images).options(name="fid-sample", **task_options)
    feature_task = ray.remote(image_stats).options(name="fid-features", **task_options)
    counts = split_counts(ev.num_samples, ev.tasks)
    image_refs, stats_refs = [], []
    for index, count in enumerate(counts):
        images = sampler_task.remote(checkpoint_url, index, count, plan, model_loader)
        image_refs.append(images)
        stats_refs.append(feature_task.remote(images, ev.inception_path, ev.feature_batch_size, options))
    return FidGraph(image_refs=image_refs, stats_refs=stats_refs, counts=counts, result_ref=None)


def launch_fid(checkpoint_url: str, cfg: Config, step: int, tracking_uri: Optional[str], run_id: Optional[str],
               model_loader: ModelLoader = load_ema_model):
    """Non-blocking FID of a checkpoint per cfg.eval; returns the reduce's ObjectRef -> {"fid","n","seconds"}."""
    return build_graph(checkpoint_url, FidPlan.from_config(cfg), step=step, tracking_uri=tracking_uri,
                       run_id=run_id, model_loader=model_loader).result_ref


def run_fid(checkpoint_url: str, plan: FidPlan, *, step: Optional[int] = None, tracking_uri: Optional[str] = None,
            run_id: Optional[str] = None, save_npz_url: Optional[str] = None, progress: bool = True,
            model_loader: ModelLoader = load_ema_model) -> dict:
    """Blocking FID with a progress bar over finished feature tasks; optionally writes the samples .npz."""
    started = time.time()
    graph = build_graph(checkpoint_url, plan, step=step, tracking_uri=tracking_uri, run_id=run_id,
                        model_loader=model_loader)
    if not save_npz_url:
        graph.image_refs.clear()  # let Ray free each task's images once its features are done
    count_of = {ref.hex(): n for ref, n in zip(graph.stats_refs, graph.counts)}
    pending = list(graph.stats_refs)
    with tqdm(total=plan.eval.num_samples, desc="fid images", unit="img", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, fetch_local=False)
            bar.update(count_of[done[0].hex()])
    if save_npz_url:
        save_npz(np.concatenate(ray.get(graph.image_refs)), save_npz_url, plan.storage_options or None)
    result = ray.get(graph.result_ref)
    result["seconds"] = time.time() - started
    return result
