"""Sweep files: the typed schema of a scaling sweep YAML, in its two designs.

`design: grid` (default): every size x every budget (`budget.steps` or `budget.flops`) x `grid` keys.
`design: isoflop`: a list of FLOP `budgets`; at each, the shared `sizes` (or the budget's own list,
chosen to span its expected optimum) train for the steps that spend the budget. Either design repeats every
point once per training seed in `seeds` (none: the base config's `train.seed` once); `close_call_seeds` adds seeds
only to the two settings of each cell that the first seeds cannot rank (scaling/close_seeds.py). An optional `gpu`
block turns the sweep's FLOPs into estimated GPU-hours for `arflow sweep --dry-run`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from arflow_scale.schema import ConfigError, check


@dataclass
class SizeSpec:
    """One model size: depth x width (ARFlow; heads default to width // 64, at least 1), and/or other keys of
    the model section (`model`, e.g. FARMER's {farmer.flow_width: 32, ...}) with a `name` for point names."""

    depth: Optional[int] = None
    width: Optional[int] = None
    heads: Optional[int] = None
    model: dict[str, Any] = field(default_factory=dict)  # dotted keys under `model.` set for this size
    name: Optional[str] = None  # in point names; default d<depth>w<width>

    def validate(self) -> None:
        check((self.depth is None) == (self.width is None), "width" if self.width is None else "depth",
              "give depth and width together (or neither, with model keys)")
        check(self.depth is not None or bool(self.model), "model", "a size needs depth and width, or model keys")
        check(self.depth is not None or self.name is not None, "name", "required when a size has no depth/width")
        check(self.name is None or bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name)), "name",
              f"{self.name!r}: use letters, digits, _ . -")
        if self.depth is None:
            return
        check(self.depth >= 1, "depth", f"must be >= 1, got {self.depth}")
        check(self.width >= 1, "width", f"must be >= 1, got {self.width}")
        check(self.width % self.num_heads == 0, "heads", f"width {self.width} not divisible by {self.num_heads}")

    @property
    def num_heads(self) -> int:
        return self.heads if self.heads is not None else max(1, self.width // 64)

    @property
    def label(self) -> str:
        return self.name if self.name is not None else f"d{self.depth}w{self.width}"

    def overrides(self) -> dict[str, Any]:
        """{dotted config key: value} this size sets."""
        shape = {} if self.depth is None else {"model.depth": self.depth, "model.width": self.width,
                                               "model.heads": self.num_heads}
        return {**shape, **{f"model.{key}": value for key, value in self.model.items()}}

    def coords(self) -> dict[str, Any]:
        """What identifies the size among a sweep's points."""
        return {"depth": self.depth, "width": self.width} if self.depth is not None else {"size": self.label}


@dataclass
class BudgetSpec:
    """Grid budgets: optimizer steps, or training FLOPs (converted to steps per model size)."""

    steps: list[int] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)

    def validate(self) -> None:
        check(bool(self.steps) != bool(self.flops), "steps", "give exactly one of budget.steps or budget.flops")
        check(all(s >= 1 for s in self.steps), "steps", f"must all be >= 1, got {self.steps}")
        check(all(f > 0 for f in self.flops), "flops", f"must all be > 0, got {self.flops}")


@dataclass
class IsoFlopBudget:
    """One IsoFLOP budget: training FLOPs and, optionally, its own sizes (else the sweep's `sizes`)."""

    flops: float
    sizes: list[SizeSpec] = field(default_factory=list)

    def validate(self) -> None:
        check(self.flops > 0, "flops", f"must be > 0, got {self.flops}")


@dataclass
class GpuSpec:
    """Assumed accelerator for cost estimates: dense peak TFLOP/s at the training precision, and the
    model FLOPs utilisation (MFU, counted FLOPs / peak) a point reaches. Unset: no GPU-hour estimate."""

    peak_tflops: Optional[float] = None
    mfu: Optional[float] = None
    name: str = ""

    def validate(self) -> None:
        check((self.peak_tflops is None) == (self.mfu is None), "mfu" if self.mfu is None else "peak_tflops",
              "give both gpu.peak_tflops and gpu.mfu (or neither)")
        check(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", f"must be > 0, got {self.peak_tflops}")
        check(self.mfu is None or 0 < self.mfu <= 1, "mfu", f"must be in (0, 1], got {self.mfu}")

    @property
    def enabled(self) -> bool:
        return self.peak_tflops is not None

    def hours(self, flops: float) -> float:
        """GPU-hours to execute `flops` counted FLOPs at peak x MFU."""
        if not self.enabled:
            raise ValueError("no GPU assumed: set gpu.peak_tflops and gpu.mfu in the sweep file")
        return flops / (self.peak_tflops * 1e12 * self.mfu) / 3600.0


@dataclass
class SweepConfig:
    name: str
    design: Literal["grid", "isoflop"] = "grid"
    sizes: list[SizeSpec] = field(default_factory=list)  # grid: all sizes; isoflop: shared by budgets
    budget: BudgetSpec = field(default_factory=BudgetSpec)  # grid only
    budgets: list[IsoFlopBudget] = field(default_factory=list)  # isoflop only; in YAML a number or {flops, sizes}
    base: Optional[str] = None  # training config YAML (relative to the sweep file, then the cwd)
    overrides: list[str] = field(default_factory=list)  # dotted key=value for every point
    grid: dict[str, list[Any]] = field(default_factory=dict)  # other dotted keys -> values
    seeds: list[int] = field(default_factory=list)  # train.seed of each repeat of every point; the fits average them
    close_call_seeds: list[int] = field(default_factory=list)  # more seeds for both settings of each close call only
    storage_path: str = "runs/sweeps"  # local folder or URL; on multi-node clusters use s3://
    storage_options: dict[str, str] = field(default_factory=dict)
    tracking_uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else sqlite in the sweep folder
    experiment: str = "arflow-sweeps"
    parallel: int = 1  # points in flight at once; 0: as many as the cluster's CPUs/GPUs fit
    fid: bool = False  # FID of each point at its end (eval.fid_at_end)
    gpu: GpuSpec = field(default_factory=GpuSpec)  # for the dry run's GPU-hour estimate only

    def validate(self) -> None:
        check(bool(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name)), "name", f"{self.name!r}: use letters, digits, _ . -")
        check(self.parallel >= 0, "parallel", f"must be >= 0, got {self.parallel}")
        for key, values in self.grid.items():
            check(isinstance(values, list) and bool(values), f"grid.{key}", f"needs a non-empty list, got {values!r}")
        check("train.seed" not in self.grid, "grid.train.seed", "list training seeds under `seeds`: the fits average a "
              "setting's seeds, while they take the best of a grid's values")
        check(len(set(self.seeds)) == len(self.seeds), "seeds", f"lists a seed twice: {self.seeds}")
        check(all(seed >= 0 for seed in self.seeds), "seeds", f"must all be >= 0, got {self.seeds}")
        self._validate_close_call_seeds()
        if self.design == "grid":
            check(not self.budgets, "budgets", "only for design: isoflop (a grid sweep uses budget.steps/flops)")
            check(bool(self.sizes), "sizes", "needs at least one model size")
            check(bool(self.budget.steps) != bool(self.budget.flops), "budget",
                  "give exactly one of budget.steps or budget.flops")
            return
        check(bool(self.budgets), "budgets", "an isoflop sweep needs at least one FLOP budget")
        check(not (self.budget.steps or self.budget.flops), "budget",
              "a grid setting; an isoflop sweep lists its FLOP budgets under `budgets`")
        levels = self.budget_levels()
        for i, level in enumerate(levels):
            check(bool(level.sizes), f"budgets[{i}].sizes", "no sizes: give the sweep's `sizes` or the budget's own")
        flops = [level.flops for level in levels]
        check(len(set(flops)) == len(flops), "budgets", f"lists a budget twice: {flops}")

    def _validate_close_call_seeds(self) -> None:
        extra = self.close_call_seeds
        if not extra:
            return
        check(len(set(extra)) == len(extra), "close_call_seeds", f"lists a seed twice: {extra}")
        check(all(seed >= 0 for seed in extra), "close_call_seeds", f"must all be >= 0, got {extra}")
        check(len(self.seeds) >= 2, "close_call_seeds", "needs two or more `seeds`: a close call is judged between "
              "settings whose seeds give a standard deviation")
        check(any(len(values) > 1 for values in self.grid.values()), "close_call_seeds",
              "needs a `grid` key with two or more values: close calls are between the settings of one cell")
        again = sorted(set(extra) & set(self.seeds))
        check(not again, "close_call_seeds", f"repeats seeds of `seeds`: {again}")

    def budget_levels(self) -> list[IsoFlopBudget]:
        """The isoflop budgets with their sizes resolved (their own list, else the shared `sizes`)."""
        return [IsoFlopBudget(flops=b.flops, sizes=b.sizes or list(self.sizes)) for b in self.budgets]

    def only_budgets(self, flops: list[float]) -> "SweepConfig":
        """This isoflop sweep narrowed to the budgets `flops` (e.g. a pilot at the smallest budget, to see that its
        sizes bracket the optimum before the rest is spent). The points keep their names and configs, so the full
        sweep later skips them as finished. ConfigError naming a value that is not one of the sweep's budgets."""
        if self.design != "isoflop":
            raise ConfigError("--budgets: only for design: isoflop (a grid sweep narrows with budget.steps=[...] or "
                              "budget.flops=[...])")
        ours = [b.flops for b in self.budgets]
        for value in flops:
            if not any(math.isclose(value, b, rel_tol=1e-9) for b in ours):
                raise ConfigError(f"--budgets: {value:g} is not a budget of sweep {self.name}; its budgets are "
                                  f"{', '.join(f'{b:g}' for b in ours)}")
        kept = [b for b in self.budgets if any(math.isclose(v, b.flops, rel_tol=1e-9) for v in flops)]
        return dataclasses.replace(self, budgets=kept)


def normalise_budgets(data: dict) -> dict:
    """A sweep mapping with each bare number in `budgets` written as {flops: number} (the YAML shorthand)."""
    budgets = data.get("budgets")
    if not isinstance(budgets, list):
        return data
    return {**data, "budgets": [b if isinstance(b, dict) else {"flops": b} for b in budgets]}
