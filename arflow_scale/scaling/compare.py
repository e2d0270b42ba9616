"""Comparisons at equal compute: the arms of a comparison file, each a training run of the same FLOPs.

Each arm's steps are its budget over the FLOPs of one of its steps (as the sweeps count them, `flops_per_step`),
rounded to a multiple of its checkpoint count so that checkpoints land exactly on the evaluation fractions;
all of them are kept, and the FID of each runs after training from them. Every arm must resolve to the same
FID protocol (the `eval.*` keys the FID reads) and the same shards; `seeds` replaces `eval.seed`.

Layout under `<storage_path>/<name>/`: compare.json (parent run id), points/<name>-<arm>.json (training
results, as sweeps keep them), runs/<name>-<arm>/ (the training runs), evals/<arm>/ (per-seed statistics and
FIDs), report/.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

from arflow_scale.config import Config, ConfigError, load_config, to_dict
from arflow_scale.eval.graph import FidPlan
from arflow_scale.model import sampling_flops
from arflow_scale.schema import apply_overrides, build, mask_override, read_yaml_mapping
from arflow_scale.tasks import task_for

from .compare_design import CompareConfig
from .design import GpuSpec
from .state import absolute_url, sweep_url
from .sweep import SweepPoint, _override, flops_per_step

# eval.* keys that are not part of the FID protocol: the held-out loss settings (K-dependent: an arm of
# K = 1 may need more sequences for as many images), when FID runs (the comparison decides) and the seed
# (replaced by each of the comparison's seeds).
NOT_PROTOCOL = ("val_every", "val_sequences", "val_batch_size", "fid_every", "fid_at_end", "seed")


@dataclass
class Arm:
    """One arm: its training run (a sweep point: config, params, FLOPs per step, steps) and evaluation steps."""

    name: str
    title: str
    point: SweepPoint
    fractions: list[float]
    evaluation_steps: list[int]  # the step of each fraction, each a checkpoint

    @property
    def config(self) -> Config:
        return self.point.config

    def flops_at(self, step: int) -> float:
        """Training FLOPs spent by `step`."""
        return float(self.point.flops_per_step) * step

    def fid_plan(self, seed: int) -> FidPlan:
        """The FID plan of this arm with sampling seed `seed`: its protocol keys alone (the others at their
        defaults, so equal protocols give equal plans), the storage options of the run folder."""
        return FidPlan.of(self.config.run.storage_options, **fid_protocol(self), seed=seed)


def load_compare(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[CompareConfig, Path]:
    """Read a comparison YAML, apply dotted overrides (e.g. `flops=1e12`), validate -> (compare, folder)."""
    path = Path(path)
    data = read_yaml_mapping(path, "comparison file")
    try:
        return build(CompareConfig, apply_overrides(data, list(overrides))), path.parent
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def compare_url(compare: CompareConfig) -> str:
    """The comparison's folder: `<storage_path>/<name>`."""
    return sweep_url(compare)


def _base_config(compare: CompareConfig, folder: Path) -> Optional[Path]:
    if not compare.base:
        return None
    base = next((c for c in (folder / compare.base, Path(compare.base)) if c.is_file()), None)
    if base is None:
        raise ConfigError(f"base: training config {compare.base!r} not found (looked in {folder} and the cwd)")
    return base


def _steps(compare: CompareConfig, per_step: int) -> int:
    """Steps spending the budget, a multiple of the checkpoint count (>= one checkpoint interval)."""
    count = compare.checkpoints
    return max(1, round(compare.flops / (per_step * count))) * count


def _arm(compare: CompareConfig, base: Optional[Path], index: int) -> Arm:
    spec = compare.arms[index]
    keys = [*compare.overrides, *spec.overrides]
    try:
        cfg = load_config(base, keys)
    except ConfigError as err:
        raise ConfigError(f"arms[{index}] ({spec.name}): {err}") from None
    per_step = flops_per_step(cfg)
    steps = _steps(compare, per_step)
    name = f"{compare.name}-{spec.name}"
    run_overrides = {"train.steps": steps, "run.name": name, "run.storage_path": f"{compare_url(compare)}/runs",
                     "tracking.experiment": compare.experiment, "checkpoint.every": steps // compare.checkpoints,
                     "checkpoint.keep_last": compare.checkpoints, "eval.val_every": steps // compare.intervals,
                     "eval.fid_every": 0, "eval.fid_at_end": False}
    if compare.storage_options:
        run_overrides["run.storage_options"] = compare.storage_options
    for key, value in (("data.manifest", cfg.data.manifest), ("eval.ref_stats", cfg.eval.ref_stats),
                       ("eval.inception_path", cfg.eval.inception_path)):
        if value and "://" not in value:  # Ray tasks and training workers may run in another directory
            run_overrides[key] = absolute_url(value)
    cfg = load_config(base, [*keys, *(_override(k, v) for k, v in run_overrides.items())])
    task = task_for(cfg.model)
    point = SweepPoint(name=name, config=cfg, params=task.count_parameters(), flops_per_step=per_step, steps=steps,
                       coords={"arm": spec.name}, budget=float(compare.flops))
    fractions = [Fraction(f).limit_denominator(1000) for f in compare.evaluations]
    return Arm(name=spec.name, title=spec.title, point=point, fractions=list(compare.evaluations),
               evaluation_steps=[int(f * steps) for f in fractions])


def plan_arms(compare: CompareConfig, folder: Path = Path(".")) -> list[Arm]:
    """The arms with their steps and evaluation steps; ConfigError unless they spend the same FLOPs (within
    `flops_tolerance`), train on the same shards and share one FID protocol."""
    base = _base_config(compare, folder)
    arms = [_arm(compare, base, i) for i in range(len(compare.arms))]
    check_equal_compute(arms, compare.flops_tolerance)
    check_same_data(arms)
    check_same_protocol(arms)
    return arms


def check_equal_compute(arms: list[Arm], tolerance: float) -> None:
    flops = {arm.name: arm.point.flops for arm in arms}
    low, high = min(flops.values()), max(flops.values())
    if high > low * (1 + tolerance):
        raise ConfigError(f"flops: the arms' training FLOPs differ by {100 * (high / low - 1):.1f}% "
                          f"(> flops_tolerance {tolerance:g}): {flops}; raise flops or checkpoint less often")


def check_same_data(arms: list[Arm]) -> None:
    first = arms[0]
    for arm in arms[1:]:
        for key in ("manifest", "storage_options"):
            mine, theirs = getattr(arm.config.data, key), getattr(first.config.data, key)
            if mine != theirs:
                raise ConfigError(f"data.{key}: arm {arm.name} trains on {mine!r}, arm {first.name} on {theirs!r}; "
                                  "the arms of a comparison train on the same shards")
    sizes = {arm.name: task_for(arm.config.model).image_shape for arm in arms}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"model.image_size: the arms make images of different shapes {sizes}")


def fid_protocol(arm: Arm) -> dict[str, Any]:
    """The resolved FID settings of an arm: its `eval` keys that FID reads (sample count, sampler, steps, CFG,
    reference statistics, Inception, batching, tasks), without the seed (the comparison's seeds replace it)."""
    settings = to_dict(arm.config.eval)
    return {key: value for key, value in settings.items() if key not in NOT_PROTOCOL}


def check_same_protocol(arms: list[Arm]) -> None:
    first, reference = arms[0], fid_protocol(arms[0])
    if not reference.get("ref_stats"):
        raise ConfigError("eval.ref_stats: the FID protocol needs reference statistics (an override of the "
                          "comparison; it makes them from reference.data when the file is missing)")
    for arm in arms[1:]:
        theirs = fid_protocol(arm)
        for key, value in reference.items():
            if theirs[key] != value:
                raise ConfigError(f"eval.{key}: arm {arm.name} has {theirs[key]!r}, arm {first.name} {value!r}; "
                                  "every arm is evaluated with one FID protocol (set it in the comparison's "
                                  "overrides, not an arm's)")


def masked_compare(compare: CompareConfig) -> CompareConfig:
    """The comparison with secret-looking override values masked (before logging it as params)."""
    arms = [dataclasses.replace(a, overrides=[mask_override(o) for o in a.overrides]) for a in compare.arms]
    return dataclasses.replace(compare, arms=arms, overrides=[mask_override(o) for o in compare.overrides])


@dataclass(frozen=True)
class CompareCost:
    """What a comparison spends: training FLOPs, FID sampling FLOPs, Inception images; GPU-hours if assumed."""

    arms: int
    train_flops: float
    sampling_flops: float
    inception_images: int
    gpu: Optional[GpuSpec] = None

    @property
    def gpu_hours(self) -> Optional[float]:
        return None if self.gpu is None else self.gpu.hours(self.train_flops + self.sampling_flops)

    def to_dict(self) -> dict:
        out = {"arms": self.arms, "train_flops": self.train_flops, "sampling_flops": self.sampling_flops,
               "inception_images": self.inception_images}
        if self.gpu is not None:
            out.update(gpu_hours=self.gpu_hours, train_gpu_hours=self.gpu.hours(self.train_flops),
                       sampling_gpu_hours=self.gpu.hours(self.sampling_flops),
                       assumptions={"gpu": self.gpu.name, "peak_tflops": self.gpu.peak_tflops, "mfu": self.gpu.mfu})
        return out


def arm_sampling_flops(arm: Arm, seeds: int) -> float:
    """FID sampling FLOPs of an arm: evaluations x seeds x samples x FLOPs of one sample (`sampling_flops`)."""
    ev = arm.config.eval
    one = sampling_flops(arm.config.model, ev.steps, guided=ev.cfg_scale != 1.0)
    return float(len(arm.evaluation_steps) * seeds * ev.num_samples * one)


def compare_cost(arms: list[Arm], seeds: int, gpu: Optional[GpuSpec] = None) -> CompareCost:
    """Totals over the arms (Inception features are counted as images, not FLOPs)."""
    return CompareCost(arms=len(arms), train_flops=sum(a.point.flops for a in arms),
                       sampling_flops=sum(arm_sampling_flops(a, seeds) for a in arms),
                       inception_images=sum(len(a.evaluation_steps) * seeds * a.config.eval.num_samples
                                            for a in arms), gpu=gpu)
