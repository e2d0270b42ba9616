"""`arflow sweep --config configs/sweeps/NAME.yaml [KEY=VALUE ...]`: a resumable scaling-law sweep."""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    parser = sub.add_parser("sweep", help="run a scaling sweep (IsoFLOP budgets or a size x budget grid), resumable")
    parser.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweeps/cpu-isoflop.yaml")
    parser.add_argument("--parallel", type=int, default=None,
                        help="points in flight (1: one after the other in this process; 0: fit the cluster)")
    parser.add_argument("--budgets", type=flops_list, default=None, metavar="FLOPS[,FLOPS...]",
                        help="isoflop: only these budgets, e.g. 1e18 (a pilot; a later full run skips its points)")
    parser.add_argument("--no-report", action="store_true", help="skip the fit/report at the end")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the points (params, steps, FLOPs, tokens) and the total cost only")
    parser.add_argument("--status", action="store_true",
                        help="where the sweep stands: each point finished, started (its checkpoint) or not; "
                             "no training")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of the sweep file, e.g. budget.steps=[20,40]")
    parser.set_defaults(handler=run)


def flops_list(text: str) -> list[float]:
    """'1e18,3e18' -> [1e18, 3e18] (argparse names the option on a bad value)."""
    values = [float(part) for part in text.split(",") if part.strip()]
    if not values:
        raise ValueError(text)
    return values


def _dry_run(sweep, folder) -> dict:
    """Print a table of the points and the total cost; return them as the JSON summary."""
    from arflow_scale.scaling.sweep import expand, sweep_cost

    points = expand(sweep, folder)
    cost = sweep_cost(points, sweep.gpu if sweep.gpu.enabled else None)
    rows = []
    print(f"{'point':<48} {'params':>10} {'steps':>8} {'FLOPs':>10} {'tokens':>10}"
          + (f" {'train GPU-h':>12}" if sweep.gpu.enabled else ""))
    for p in points:
        row = {**p.coords, "name": p.name, "params": p.params, "steps": p.steps, "flops": p.flops,
               "tokens": p.tokens, "images": p.images, "budget": p.budget}  # coords' flops is the budget
        line = f"{p.name:<48} {p.params:>10.3g} {p.steps:>8d} {p.flops:>10.3g} {p.tokens:>10.3g}"
        if sweep.gpu.enabled:
            row["gpu_hours"] = sweep.gpu.hours(p.flops)
            line += f" {row['gpu_hours']:>12.3g}"
        rows.append(row)
        print(line)
    total = cost.to_dict()
    print(f"total: {cost.points} points, {cost.train_flops:.3g} training FLOPs, {cost.eval_flops:.3g} FID sampling "
          f"FLOPs, {cost.tokens:.3g} tokens, {cost.images:.3g} images"
          + (f"; {cost.gpu_hours:.4g} GPU-hours on {sweep.gpu.name or 'the assumed GPU'} at "
             f"{sweep.gpu.peak_tflops:g} TFLOP/s peak x MFU {sweep.gpu.mfu:g}" if sweep.gpu.enabled else ""))
    summary = {"sweep": sweep.name, "design": sweep.design, "points": rows, "cost": total}
    if sweep.close_call_seeds:
        summary["close_call_seeds"] = _close_call_cost(sweep, folder)
    return summary


def _close_call_cost(sweep, folder) -> dict:
    """Print and return the most that `close_call_seeds` can add (both settings of every cell in a close call)."""
    from arflow_scale.scaling.close_seeds import close_call_bound
    from arflow_scale.scaling.sweep import close_call_candidates, sweep_cost

    cost = sweep_cost(close_call_bound(close_call_candidates(sweep, folder)), sweep.gpu if sweep.gpu.enabled else None)
    print(f"close_call_seeds {sweep.close_call_seeds}: at most {cost.points} more points, {cost.train_flops:.3g} "
          "training FLOPs" + (f", {cost.gpu_hours:.4g} GPU-hours" if sweep.gpu.enabled else "")
          + ", for both settings of each cell whose seeds above do not rank them (decided once they finish)")
    return {"seeds": list(sweep.close_call_seeds), "at_most": cost.to_dict()}


def _status(sweep, folder) -> dict:
    """Print each point's state and the compute done; return them as the JSON summary."""
    from arflow_scale.scaling.finished import finished_points
    from arflow_scale.scaling.progress import points_progress
    from arflow_scale.scaling.sweep import expand, planned_close_call_points, sweep_url

    what, root, points = f"sweep {sweep.name}", sweep_url(sweep), expand(sweep, folder)
    records, todo = finished_points(points, root, sweep.storage_options, what)
    extra = [] if todo else planned_close_call_points(sweep, folder, [records[p.name] for p in points])
    records.update(finished_points(extra, root, sweep.storage_options, what)[0])
    progress = points_progress([*points, *extra], root, sweep.storage_options, what, records=records)
    print(f"{'point':<48} {'params':>10} {'state':>12} {'step':>17} {'loss':>8}")
    for p in progress:
        loss = f"{p.loss:.4g}" if p.loss is not None else "-"
        print(f"{p.name:<48} {p.params:>10.3g} {p.state:>12} {f'{p.step}/{p.steps}':>17} {loss:>8}")
    done, total = sum(p.flops_done for p in progress), sum(p.flops for p in progress)
    finished = sum(p.state == "finished" for p in progress)
    left = f"; {sweep.gpu.hours(total - done):.4g} GPU-hours of training left at the assumed MFU" \
        if sweep.gpu.enabled else ""
    print(f"{finished} of {len(progress)} points finished, {done / total:.1%} of the training FLOPs done{left}")
    summary = {"sweep": sweep.name, "points": [p.to_dict() for p in progress], "finished": finished,
               "flops_done": done, "flops": total}
    if sweep.close_call_seeds:
        print(f"close_call_seeds {sweep.close_call_seeds}: " + (
            f"decided once the sweep's own {len(points)} points are finished" if todo else
            f"{len(extra)} points, for {len({p.setting for p in extra})} settings in close calls (listed above)"))
        summary["close_call_seeds"] = {"decided": not todo, "points": [p.name for p in extra]}
    return summary


def run(args) -> int:
    from pathlib import Path

    from arflow_scale.scaling.sweep import load_sweep, run_sweep, sweep_url

    sweep, folder = load_sweep(args.config, args.overrides)
    if args.dry_run or args.status:
        narrowed = sweep if args.budgets is None else sweep.only_budgets(args.budgets)
        print(json.dumps((_status if args.status else _dry_run)(narrowed, folder)), flush=True)
        return 0
    summary = run_sweep(sweep, folder, parallel=args.parallel, budgets=args.budgets)
    code = 0
    if not args.no_report and len(summary["points"]) >= 3:
        root = sweep_url(sweep)
        out = Path(root, "report") if "://" not in root else Path("runs", "sweeps", sweep.name, "report")
        code = _report(summary, out)
    keep = ("name", "params", "flops", "steps", "tokens", "budget", "loss", "fid", "run_id")
    summary["points"] = [{k: r.get(k) for k in keep} for r in summary["points"]]
    print(json.dumps(summary), flush=True)
    return code


def _report(summary: dict, out) -> int:
    """Fit the trained points and write the report into `out`, adding its fits and notes to `summary`; 1 when the
    report fails, saying that every point is trained and recorded and how to fit them again."""
    from arflow_scale.scaling.points import point_from_record
    from arflow_scale.scaling.report import write_report

    try:
        report = write_report([point_from_record(r) for r in summary["points"]], out,
                              parent_run_id=summary["parent_run_id"], tracking_uri=summary["tracking_uri"])
    except Exception as err:  # noqa: BLE001 - the trained points are safe: say so, and how to fit them again
        print(f"arflow sweep: every point is trained and recorded, but the report failed ({type(err).__name__}: "
              f"{err}); fit them again with `arflow scaling fit --parent-run {summary['parent_run_id']} "
              f"--tracking-uri {summary['tracking_uri']}`, or run the sweep again", file=sys.stderr)
        return 1
    summary["fits"] = report["fits"]
    summary["report_dir"] = report["out_dir"]
    summary["notes"] = report["notes"]  # e.g. a budget whose optimum its sizes do not bracket
    for note in report["notes"]:
        print(f"arflow sweep: {note}", file=sys.stderr)
    return 0
