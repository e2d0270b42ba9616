"""`arflow scaling fit`: power laws L(N), L(C), FID(C) from a CSV, an MLflow experiment or a parent run."""
from __future__ import annotations

import json


def register(sub) -> None:
    parser = sub.add_parser("scaling", help="fit scaling laws from finished runs")
    scaling_sub = parser.add_subparsers(dest="scaling_command", required=True, metavar="ACTION")
    fit = scaling_sub.add_parser("fit", help="fit L(N), L(C), FID(C) with confidence intervals")
    source = fit.add_mutually_exclusive_group(required=True)
    source.add_argument("--experiment", help="MLflow experiment name (every finished sweep point in it)")
    source.add_argument("--parent-run", help="MLflow parent run id of a sweep (its nested runs)")
    source.add_argument("--csv", help="CSV with header params,flops,loss[,fid][,name]")
    fit.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    fit.add_argument("--out", default="scaling_report", help="folder for points.csv, scaling.md, fits.json, PNGs")
    fit.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    fit.add_argument("--irreducible", action="store_true", help="fit y = a x^b + c (c >= 0) instead of y = a x^b")
    fit.set_defaults(handler=run_fit)


def run_fit(args) -> int:
    from arflow_scale.scaling.fit import points_from_csv, points_from_mlflow
    from arflow_scale.scaling.report import write_report

    if args.csv:
        points = points_from_csv(args.csv)
    else:
        points = points_from_mlflow(experiment=args.experiment, parent_run_id=args.parent_run,
                                    tracking_uri=args.tracking_uri)
    summary = write_report(points, args.out, confidence=args.confidence, irreducible=args.irreducible,
                           parent_run_id=args.parent_run, tracking_uri=args.tracking_uri)
    print(json.dumps(summary), flush=True)
    return 0
