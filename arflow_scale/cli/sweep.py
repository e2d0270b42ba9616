"""`arflow sweep --config configs/sweeps/NAME.yaml [KEY=VALUE ...]`: a resumable scaling-law sweep."""
from __future__ import annotations

import json


def register(sub) -> None:
    parser = sub.add_parser("sweep", help="run a scaling sweep (model size x budget x keys), resumable")
    parser.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweeps/cpu-tiny.yaml")
    parser.add_argument("--parallel", type=int, default=None,
                        help="points in flight (1: one after the other in this process; 0: fit the cluster)")
    parser.add_argument("--no-report", action="store_true", help="skip the fit/report at the end")
    parser.add_argument("--dry-run", action="store_true", help="list the points (params, steps, FLOPs) only")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of the sweep file, e.g. budget.steps=[20,40]")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from pathlib import Path

    from arflow_scale.scaling.sweep import expand, load_sweep, run_sweep, sweep_url

    sweep, folder = load_sweep(args.config, args.overrides)
    if args.dry_run:
        points = [{"name": p.name, "params": p.params, "steps": p.steps, "flops": p.flops, **p.coords}
                  for p in expand(sweep, folder)]
        print(json.dumps({"sweep": sweep.name, "points": points}), flush=True)
        return 0
    summary = run_sweep(sweep, folder, parallel=args.parallel)
    if not args.no_report and len(summary["points"]) >= 3:
        from arflow_scale.scaling.fit import ScalingPoint
        from arflow_scale.scaling.report import write_report

        root = sweep_url(sweep)
        out = Path(root, "report") if "://" not in root else Path("runs", "sweeps", sweep.name, "report")
        points = [ScalingPoint(params=r["params"], flops=r["flops"], loss=r["loss"], fid=r.get("fid"),
                               name=r["name"], run_id=r.get("run_id") or "") for r in summary["points"]]
        report = write_report(points, out, parent_run_id=summary["parent_run_id"],
                              tracking_uri=summary["tracking_uri"])
        summary["fits"] = report["fits"]
        summary["report_dir"] = report["out_dir"]
    summary["points"] = [{k: r[k] for k in ("name", "params", "flops", "steps", "loss", "fid", "run_id")}
                         for r in summary["points"]]
    print(json.dumps(summary), flush=True)
    return 0
