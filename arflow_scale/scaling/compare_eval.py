"""The evaluations of a comparison: reference statistics made once, then one FID graph per arm, evaluation
step and sampling seed, run after training from the kept checkpoints (Ray tasks, a few graphs in flight).

Each finished evaluation leaves its Inception statistics (`.npz`, mergeable: the seeds of a step are pooled
into one FID) and a record (`.json`, written last) under `<comparison>/evals/<arm>/`; a rerun skips them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import ray
from mlflow.tracking import MlflowClient

from arflow_scale.checkpoint import checkpoint_dir_name, is_complete
from arflow_scale.cluster.connect import ray_session
from arflow_scale.config import ConfigError
from arflow_scale.data import write_shards
from arflow_scale.data.manifest import MANIFEST_NAME
from arflow_scale.data.storage import filesystem, join_url
from arflow_scale.eval.frechet import fid_from_stats
from arflow_scale.eval.graph import submit_sampling
from arflow_scale.eval.reference import image_set_stats
from arflow_scale.eval.stats import GaussianStats
from arflow_scale.train.launch_plan import run_folder_url

from .compare import Arm, fid_protocol
from .compare_design import CompareConfig
from .state import read_json, write_json

log = logging.getLogger(__name__)
IN_FLIGHT = 2  # evaluations submitted at once: one samples while the other's features finish


@dataclass(frozen=True)
class Evaluation:
    """One FID evaluation: an arm's checkpoint at `step`, sampled with `seed`."""

    arm: str
    step: int
    seed: int

    def url(self, root: str, suffix: str) -> str:
        """`<root>/evals/<arm>/step_<step>_seed_<seed><suffix>` (.npz statistics, .json record)."""
        return f"{root}/evals/{self.arm}/step_{self.step:09d}_seed_{self.seed}{suffix}"


def pooled_fid(arm: str, step: int, seeds: list[int], root: str, options: dict,
               reference: Callable[[], GaussianStats]) -> Optional[dict[str, Any]]:
    """{"fid", "n", "fid_seeds"} of an arm's step with every seed's samples pooled, or None while a seed is
    missing. Kept in `step_<step>_pooled.json`, reused while the seeds' records are the ones it was made from."""
    evs = [Evaluation(arm, step, seed) for seed in seeds]
    records = [read_json(ev.url(root, ".json"), options) for ev in evs]
    if not all(records):
        return None
    made_from = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
    url = f"{root}/evals/{arm}/step_{step:09d}_pooled.json"
    cached = read_json(url, options)
    if cached is not None and cached.get("made_from") == made_from:
        return cached
    stats = GaussianStats.merge_all([GaussianStats.load(ev.url(root, ".npz"), options) for ev in evs])
    result = {"fid": fid_from_stats(stats, reference()), "n": stats.count,
              "fid_seeds": {str(r["seed"]): r["fid"] for r in records}, "made_from": made_from}
    write_json(url, result, options)
    return result


def evaluations(arm: Arm, seeds: list[int]) -> list[Evaluation]:
    return [Evaluation(arm.name, step, seed) for step in arm.evaluation_steps for seed in seeds]


def ensure_reference(compare: CompareConfig, arm: Arm) -> str:
    """The reference statistics URL (`eval.ref_stats`), computed first when missing: the Inception statistics
    of `reference.data`, whose shards are written from `reference.source` (its split) when missing."""
    ev, spec, options = arm.config.eval, compare.reference, dict(compare.storage_options)
    fs, path = filesystem(ev.ref_stats, options)
    if fs.isfile(path):
        return ev.ref_stats
    if spec.data is None:
        raise FileNotFoundError(f"{ev.ref_stats}: reference statistics not found (eval.ref_stats); make them with "
                                "`arflow fid ref`, or name their images in the comparison's reference.data")
    data_fs, data_path = filesystem(join_url(spec.data, MANIFEST_NAME), options)
    if spec.source and not data_fs.exists(data_path):
        size = arm.config.model.image_size
        log.info("writing the %s split of %s (%dx%d) to %s", spec.split, spec.source, size, size, spec.data)
        write_shards(spec.source, spec.data, image_size=size, samples_per_shard=spec.samples_per_shard,
                     split=spec.split, storage_options=options, progress=False)
    started = time.time()
    stats = image_set_stats(spec.data, num=spec.num, batch_size=ev.feature_batch_size,
                            inception_path=ev.inception_path, storage_options=options, progress=False)
    stats.save(ev.ref_stats, options)
    log.info("reference statistics of %d images of %s -> %s (%.0f s)", stats.count, spec.data, ev.ref_stats,
             time.time() - started)
    return ev.ref_stats


def pending(arms: list[Arm], compare: CompareConfig, root: str) -> list[Evaluation]:
    """Evaluations without a record; a record made with another FID protocol is a ConfigError."""
    todo = []
    for arm in arms:
        protocol = fid_protocol(arm)
        for ev in evaluations(arm, compare.seeds):
            record = read_json(ev.url(root, ".json"), compare.storage_options)
            if record is None:
                todo.append(ev)
            elif record.get("protocol") != protocol or record.get("flops_per_step") != arm.point.flops_per_step:
                raise ConfigError(f"{ev.url(root, '.json')}: evaluated under another FID protocol or arm than "
                                  f"{compare.name} now gives; rename the comparison or delete its evals/ to redo")
    return todo


def _checkpoint(arm: Arm, step: int, options: dict) -> str:
    cfg = arm.config
    url = f"{run_folder_url(cfg.run.storage_path, cfg.run.name)}/{checkpoint_dir_name(step)}"
    if not is_complete(url, options):
        raise FileNotFoundError(f"{url}: arm {arm.name} has no complete checkpoint at its evaluation step {step} "
                                f"(checkpoint.every {cfg.checkpoint.every}, keep_last {cfg.checkpoint.keep_last})")
    return url


class _Running:
    """One submitted evaluation: its graph's statistics refs and when it started."""

    def __init__(self, ev: Evaluation, arm: Arm, checkpoint: str):
        self.ev, self.arm, self.checkpoint, self.started = ev, arm, checkpoint, time.time()
        graph = submit_sampling(checkpoint, arm.fid_plan(ev.seed))
        graph.image_refs.clear()  # Ray frees each task's images once its features are done
        self.refs = graph.stats_refs


def _finish(job: _Running, reference: GaussianStats, root: str, options: dict) -> dict[str, Any]:
    """Merge a finished graph's statistics, store them, then its record (last: the evaluation counts)."""
    stats = GaussianStats.merge_all(ray.get(job.refs))
    stats.save(job.ev.url(root, ".npz"), options)
    record = {**dataclasses.asdict(job.ev), "n": stats.count, "fid": fid_from_stats(stats, reference),
              "checkpoint": job.checkpoint, "protocol": fid_protocol(job.arm),
              "flops_per_step": job.arm.point.flops_per_step, "seconds": round(time.time() - job.started, 3)}
    write_json(job.ev.url(root, ".json"), record, options)
    log.info("FID of %s at step %d, seed %d: %.3f (%d samples, %.0f s)", job.ev.arm, job.ev.step, job.ev.seed,
             record["fid"], stats.count, record["seconds"])
    return record


def run_evaluations(todo: list[Evaluation], arms: list[Arm], compare: CompareConfig, root: str,
                    run_ids: dict[str, Optional[str]], tracking_uri: str) -> list[dict[str, Any]]:
    """Run the pending evaluations as FID graphs on Ray (joined, or a local one for the duration); log
    `fid_seed_<s>` to each arm's run. -> their records."""
    if not todo:
        return []
    by_name, options = {arm.name: arm for arm in arms}, dict(compare.storage_options)
    queue = [(ev, by_name[ev.arm], _checkpoint(by_name[ev.arm], ev.step, options)) for ev in todo]  # all there?
    reference = GaussianStats.load(arms[0].config.eval.ref_stats, options)
    cluster = arms[0].config.cluster
    client = MlflowClient(tracking_uri=tracking_uri)
    log.info("%d FID evaluations to run (%d samples each)", len(todo), arms[0].config.eval.num_samples)
    records = []
    with ray_session(cluster.address, cluster.local_num_cpus, dashboard=False):
        for record in _run_graphs(queue, reference, root, options):
            records.append(record)
            if run_ids.get(record["arm"]):
                client.log_metric(run_ids[record["arm"]], f"fid_seed_{record['seed']}", record["fid"],
                                  step=record["step"])
    return records


def _run_graphs(queue: list[tuple[Evaluation, Arm, str]], reference: GaussianStats, root: str,
                options: dict) -> Iterator[dict[str, Any]]:
    """Submit the graphs IN_FLIGHT at a time; yield each evaluation's record as it is stored."""
    queue, running = list(queue), []
    while queue or running:
        while queue and len(running) < IN_FLIGHT:
            running.append(_Running(*queue.pop(0)))
        ray.wait([ref for job in running for ref in job.refs], num_returns=sum(len(j.refs) for j in running),
                 timeout=5.0, fetch_local=False)
        for job in [j for j in running if not ray.wait(j.refs, num_returns=len(j.refs), timeout=0)[1]]:
            running.remove(job)
            yield _finish(job, reference, root, options)
