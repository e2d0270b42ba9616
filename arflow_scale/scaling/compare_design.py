"""Comparison files: the typed schema of `arflow compare` (configs/compare/*.yaml).

A comparison trains several arms (model variants, each a list of dotted overrides of one base config) on the
same shards for the same training FLOPs, then evaluates every arm with one FID protocol (the arms' shared
`eval.*` section) at the same fractions of that budget, over several sampling seeds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from math import lcm
from typing import Optional

from arflow_scale.data.sources import SOURCES, SPLITS
from arflow_scale.schema import check, fail, parse_override

from .design import GpuSpec

NAME = re.compile(r"[A-Za-z0-9_.-]+")
# Keys the comparison sets on every arm itself (steps from the budget, checkpoints on the evaluation steps,
# storage and tracking of the comparison): an arm overriding one would break equal compute or resumption.
OWNED_KEYS = ("train.steps", "checkpoint.", "run.name", "run.storage_path", "run.storage_options", "tracking.",
              "eval.val_every", "eval.fid_every", "eval.fid_at_end")
MAX_CHECKPOINTS = 200  # checkpoints kept per arm (all of them: FID runs after training)


@dataclass
class ArmSpec:
    """One arm: a name, the dotted overrides that make it (e.g. model.k=1, model.attention=intra), a legend label."""

    name: str
    overrides: list[str] = field(default_factory=list)
    label: str = ""  # legend and table text; empty: the name

    def validate(self) -> None:
        check(bool(NAME.fullmatch(self.name)), "name", f"{self.name!r}: use letters, digits, _ . -")
        for text in self.overrides:
            key = ".".join(parse_override(text)[0])
            owned = next((o for o in OWNED_KEYS if key == o or (o.endswith(".") and key.startswith(o))), None)
            if owned is not None:
                fail("overrides", f"{text!r}: the comparison sets {owned.rstrip('.')} for every arm")

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass
class ReferenceSpec:
    """How to make the reference statistics (the arms' `eval.ref_stats`) when they are missing: Inception
    statistics of the shard folder `data`, itself written first from `source`'s `split` when missing."""

    data: Optional[str] = None  # shard folder of the reference images; None: eval.ref_stats must exist
    source: Optional[str] = None  # a data source (arflow data shards --source) to write `data` from
    split: str = "test"
    num: Optional[int] = None  # images used (class-proportional); None: all
    samples_per_shard: int = 1000

    def validate(self) -> None:
        check(self.source is None or self.source in SOURCES, "source",
              f"{self.source!r} is not one of {', '.join(SOURCES)}")
        check(self.source is None or self.data is not None, "data", "a reference source needs the folder to write")
        check(self.split in SPLITS, "split", f"{self.split!r} is not one of {', '.join(SPLITS)}")
        check(self.num is None or self.num >= 2, "num", f"must be >= 2 (or null for all), got {self.num}")
        check(self.samples_per_shard >= 1, "samples_per_shard", f"must be >= 1, got {self.samples_per_shard}")


@dataclass
class CompareConfig:
    name: str
    arms: list[ArmSpec] = field(default_factory=list)
    flops: float = 0.0  # training FLOPs of every arm (3 x forward FLOPs x sequences per step x steps)
    evaluations: list[float] = field(default_factory=lambda: [0.5, 1.0])  # budget fractions evaluated (FID, losses)
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # sampling seeds; each replaces eval.seed
    baseline: Optional[str] = None  # the arm the others are compared with in the table
    base: Optional[str] = None  # training config YAML (relative to the comparison file, then the cwd)
    overrides: list[str] = field(default_factory=list)  # dotted key=value for every arm (eval.* = the protocol)
    checkpoints_per_interval: int = 1  # checkpoints between two evaluation steps (more: less lost on a crash)
    flops_tolerance: float = 0.02  # largest relative spread of the arms' training FLOPs
    loss_window: float = 0.1  # training loss at a step: mean over this fraction of the arm's steps before it
    reference: ReferenceSpec = field(default_factory=ReferenceSpec)
    storage_path: str = "runs/compare"  # local folder or URL; on multi-node clusters use s3://
    storage_options: dict[str, str] = field(default_factory=dict)
    tracking_uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else sqlite in the comparison folder
    experiment: str = "arflow-compare"
    parallel: int = 1  # arms trained at once; 0: as many as the cluster's CPUs/GPUs fit
    gpu: GpuSpec = field(default_factory=GpuSpec)  # for the dry run's GPU-hour estimate only

    def validate(self) -> None:
        check(bool(NAME.fullmatch(self.name)), "name", f"{self.name!r}: use letters, digits, _ . -")
        check(len(self.arms) >= 2, "arms", f"a comparison needs at least two arms, got {len(self.arms)}")
        names = [arm.name for arm in self.arms]
        check(len(set(names)) == len(names), "arms", f"arm names must be distinct, got {names}")
        check(self.baseline is None or self.baseline in names, "baseline",
              f"{self.baseline!r} is not an arm ({', '.join(names)})")
        check(self.flops > 0, "flops", f"must be > 0 (training FLOPs of every arm), got {self.flops}")
        check(bool(self.evaluations), "evaluations", "needs at least one budget fraction")
        check(all(0 < f <= 1 for f in self.evaluations), "evaluations", f"fractions must lie in (0, 1], got "
              f"{self.evaluations}")
        check(all(a < b for a, b in zip(self.evaluations, self.evaluations[1:])), "evaluations",
              f"must increase strictly, got {self.evaluations}")
        check(len(self.seeds) >= 2 and len(set(self.seeds)) == len(self.seeds), "seeds",
              f"needs at least two distinct sampling seeds (each FID's spread), got {self.seeds}")
        check(self.checkpoints_per_interval >= 1, "checkpoints_per_interval",
              f"must be >= 1, got {self.checkpoints_per_interval}")
        check(self.checkpoints <= MAX_CHECKPOINTS, "checkpoints_per_interval",
              f"{self.checkpoints} checkpoints per arm (all kept until evaluated); at most {MAX_CHECKPOINTS}: "
              f"use fewer or rounder evaluation fractions")
        check(0 < self.flops_tolerance < 0.5, "flops_tolerance", f"must lie in (0, 0.5), got {self.flops_tolerance}")
        check(0 < self.loss_window <= 1, "loss_window", f"must lie in (0, 1], got {self.loss_window}")
        check(self.parallel >= 0, "parallel", f"must be >= 0, got {self.parallel}")

    @property
    def intervals(self) -> int:
        """Equal intervals of every arm's steps on whose ends all evaluation fractions fall (1/2, 1: 2)."""
        return lcm(*(Fraction(f).limit_denominator(1000).denominator for f in self.evaluations))

    @property
    def checkpoints(self) -> int:
        """Checkpoints of every arm: its steps are a multiple of this and all are kept (`checkpoint.keep_last`)."""
        return self.intervals * self.checkpoints_per_interval
