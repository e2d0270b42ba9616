"""The comparison's report: one row per arm and evaluation step (FID pooled over the seeds and per seed, the
training loss and the held-out losses), as results.json, results.csv, table.md and a plot of FID against
training FLOPs (one line per arm), saved in one folder and logged to the parent MLflow run under `compare/`.
"""
from __future__ import annotations

import csv
import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from mlflow.tracking import MlflowClient

from arflow_scale.eval.stats import GaussianStats
from arflow_scale.tasks import task_for

from .compare import Arm, fid_protocol
from .compare_design import CompareConfig
from .compare_eval import pooled_fid

CSV_COLUMNS = ("arm", "label", "fraction", "step", "flops", "fid", "n", "fid_seed_min", "fid_seed_max",
               "fid_vs_baseline", "train_loss", "val_loss", "val_loss_ema")


@dataclass
class CompareRow:
    """One arm at one evaluation step (a fraction of the FLOP budget)."""

    arm: str
    label: str
    fraction: float
    step: int
    flops: float  # training FLOPs spent by `step`
    fid: Optional[float] = None  # all seeds' samples pooled (n of them)
    n: int = 0
    fid_seeds: dict[int, float] = field(default_factory=dict)  # seed -> FID of its samples alone
    train_loss: Optional[float] = None  # mean logged training loss over the window before `step` (loss_window)
    val_loss: Optional[float] = None  # held-out loss of the raw weights at `step`
    val_loss_ema: Optional[float] = None  # ... of the EMA weights
    fid_vs_baseline: Optional[float] = None  # fid minus the baseline arm's fid at the same fraction

    @property
    def fid_seed_range(self) -> Optional[tuple[float, float]]:
        values = list(self.fid_seeds.values())
        return (min(values), max(values)) if values else None


def _metric_at(client: MlflowClient, run_id: str, key: str, step: int) -> Optional[float]:
    values = [m.value for m in client.get_metric_history(run_id, key) if m.step == step and math.isfinite(m.value)]
    return values[-1] if values else None


def _mean_over(client: MlflowClient, run_id: str, key: str, first: int, last: int) -> Optional[float]:
    """Mean of the logged values of `key` at steps first..last (one value per step: a resumed run's last)."""
    by_step = {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
               if first <= m.step <= last and math.isfinite(m.value)}
    return sum(by_step.values()) / len(by_step) if by_step else None


def _losses(row: CompareRow, arm: Arm, window: float, client: Optional[MlflowClient], run_id: Optional[str]) -> None:
    if client is None or not run_id:
        return
    width = max(round(window * arm.point.steps), arm.config.train.log_every)  # holds a logged step
    loss_metric = task_for(arm.config.model).loss_metric
    row.train_loss = _mean_over(client, run_id, loss_metric, row.step - width + 1, row.step)
    row.val_loss = _metric_at(client, run_id, "val_loss", row.step)
    row.val_loss_ema = _metric_at(client, run_id, "val_loss_ema", row.step)


def collect_rows(arms: list[Arm], compare: CompareConfig, root: str, run_ids: dict[str, Optional[str]],
                 tracking_uri: Optional[str]) -> list[CompareRow]:
    """Rows of every arm and step; FID fields stay empty where an evaluation is missing."""
    options = dict(compare.storage_options)
    reference = functools.cache(lambda: GaussianStats.load(arms[0].config.eval.ref_stats, options))
    client = MlflowClient(tracking_uri=tracking_uri) if tracking_uri else None
    rows = []
    for arm in arms:
        for fraction, step in zip(arm.fractions, arm.evaluation_steps):
            row = CompareRow(arm=arm.name, label=arm.title, fraction=fraction, step=step, flops=arm.flops_at(step))
            pooled = pooled_fid(arm.name, step, compare.seeds, root, options, reference)
            if pooled is not None:
                row.fid, row.n = pooled["fid"], pooled["n"]
                row.fid_seeds = {int(seed): fid for seed, fid in pooled["fid_seeds"].items()}
            _losses(row, arm, compare.loss_window, client, run_ids.get(arm.name))
            rows.append(row)
    if compare.baseline:
        base = {r.fraction: r.fid for r in rows if r.arm == compare.baseline}
        for row in rows:
            if row.fid is not None and base.get(row.fraction) is not None:
                row.fid_vs_baseline = row.fid - base[row.fraction]
    return rows


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def table_markdown(rows: Sequence[CompareRow], compare: CompareConfig, seeds_n: Optional[int] = None) -> str:
    """A markdown table: one line per arm and budget fraction."""
    per_seed = f" (n = {seeds_n} each)" if seeds_n else ""
    head = ["arm", "budget", "step", "training FLOPs", "FID (seeds pooled, n)", f"FID per seed{per_seed}",
            "seed range"]
    if compare.baseline:
        head.append(f"FID - {compare.baseline}")
    head += ["train loss", "val loss", "val loss (EMA)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        seeds = ", ".join(f"{_fmt(v)}" for _, v in sorted(r.fid_seeds.items())) or "-"
        spread = r.fid_seed_range
        cells = [r.label, f"{r.fraction:g}", str(r.step), f"{r.flops:.3g}",
                 f"{_fmt(r.fid)} ({r.n})" if r.fid is not None else "-", seeds,
                 _fmt(spread[1] - spread[0], 3) if spread else "-"]
        if compare.baseline:
            cells.append("-" if r.fid_vs_baseline is None else f"{r.fid_vs_baseline:+.3g}")
        cells += [_fmt(r.train_loss), _fmt(r.val_loss), _fmt(r.val_loss_ema)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_fid_vs_flops(rows: Sequence[CompareRow], path: Path, title: str = "") -> Path:
    """FID (seeds pooled) against training FLOPs, one line per arm; each seed's FID as a hollow marker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        arms = list(dict.fromkeys(r.arm for r in rows))
        for index, arm in enumerate(arms):
            mine = [r for r in rows if r.arm == arm and r.fid is not None]
            if not mine:
                continue
            colour = f"C{index % 10}"
            ax.plot([r.flops for r in mine], [r.fid for r in mine], "o-", color=colour, label=mine[0].label)
            seeds = [(r.flops, v) for r in mine for v in r.fid_seeds.values()]
            ax.scatter([x for x, _ in seeds], [y for _, y in seeds], facecolors="none", edgecolors=colour, s=18)
        ax.set_xscale("log")
        budgets = sorted({float(f"{r.flops:.2g}") for r in rows})  # one labelled tick per evaluated budget
        ax.set_xticks(budgets, [f"{b:.2g}" for b in budgets])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("FID (filled: seeds pooled; hollow: each seed)")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def write_compare_report(rows: list[CompareRow], arms: list[Arm], compare: CompareConfig, out_dir: str | Path, *,
                         parent_run_id: Optional[str] = None, tracking_uri: Optional[str] = None) -> dict:
    """results.json, results.csv, table.md and fid_vs_flops.png in `out_dir`; logged to the parent run."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    protocol = fid_protocol(arms[0])
    table = table_markdown(rows, compare, protocol["num_samples"])
    (out / "table.md").write_text(table)
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            spread = r.fid_seed_range or (None, None)
            writer.writerow([r.arm, r.label, r.fraction, r.step, r.flops, r.fid, r.n, spread[0], spread[1],
                             r.fid_vs_baseline, r.train_loss, r.val_loss, r.val_loss_ema])
    summary = {"comparison": compare.name, "budget_flops": compare.flops, "baseline": compare.baseline,
               "seeds": list(compare.seeds), "protocol": protocol,
               "arms": [{"name": a.name, "label": a.title, "params": a.point.params, "steps": a.point.steps,
                         "flops": a.point.flops, "flops_per_step": a.point.flops_per_step,
                         "k": a.config.model.k, "attention": a.config.model.attention,
                         "evaluation_steps": a.evaluation_steps} for a in arms],
               "rows": [asdict(r) for r in rows]}
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    plot_fid_vs_flops(rows, out / "fid_vs_flops.png", f"{compare.name}: {len(compare.seeds)} seeds x "
                      f"{protocol['num_samples']} samples, {protocol['sampler']} {protocol['steps']} steps, "
                      f"CFG {protocol['cfg_scale']:g}")
    if parent_run_id:
        MlflowClient(tracking_uri=tracking_uri).log_artifacts(parent_run_id, str(out), artifact_path="compare")
    return {"out_dir": str(out), "table": table, "rows": summary["rows"]}
