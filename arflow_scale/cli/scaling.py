"""`arflow scaling fit`: IsoFLOP profiles and frontier, the parametric law L(N, D), single power laws and
a held-out prediction check, from a CSV, an MLflow experiment or a sweep's parent run."""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    from arflow_scale.scaling.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED
    from arflow_scale.scaling.isoflop import DEFAULT_BUDGET_TOLERANCE

    parser = sub.add_parser("scaling", help="fit scaling laws from finished runs")
    scaling_sub = parser.add_subparsers(dest="scaling_command", required=True, metavar="ACTION")
    fit = scaling_sub.add_parser("fit", help="IsoFLOP frontier, L(N, D), power laws, with bootstrap intervals")
    source = fit.add_mutually_exclusive_group(required=True)
    source.add_argument("--experiment", help="MLflow experiment name (every finished sweep point in it)")
    source.add_argument("--parent-run", help="MLflow parent run id of a sweep (its nested runs)")
    source.add_argument("--csv", help="CSV with header params,flops,loss[,tokens][,images][,budget][,fid][,name]"
                        "[,run_id][,setting] (rows of one setting: seeds, averaged)")
    fit.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    fit.add_argument("--out", default="scaling_report", help="folder for points.csv, scaling.md, fits.json, PNGs")
    fit.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    fit.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples (0: none)")
    fit.add_argument("--seed", type=int, default=DEFAULT_SEED, help="bootstrap seed")
    fit.add_argument("--budget-tolerance", type=float, default=DEFAULT_BUDGET_TOLERANCE,
                     help="without a budget per point: relative FLOPs spread of one IsoFLOP budget")
    fit.add_argument("--irreducible", action="store_true",
                     help="single power laws as y = a x^b + c (c >= 0) instead of y = a x^b")
    fit.set_defaults(handler=run_fit)


def run_fit(args) -> int:
    from arflow_scale.scaling.bootstrap import BootstrapSettings
    from arflow_scale.scaling.points import points_from_csv, points_from_mlflow
    from arflow_scale.scaling.report import write_report

    settings = BootstrapSettings(resamples=args.resamples, seed=args.seed, confidence=args.confidence)
    if args.csv:
        points = points_from_csv(args.csv)
    else:
        points = points_from_mlflow(experiment=args.experiment, parent_run_id=args.parent_run,
                                    tracking_uri=args.tracking_uri)
    summary = write_report(points, args.out, settings=settings, irreducible=args.irreducible,
                           tolerance=args.budget_tolerance, parent_run_id=args.parent_run,
                           tracking_uri=args.tracking_uri)
    for note in summary["notes"]:
        print(f"arflow scaling fit: {note}", file=sys.stderr)
    print(json.dumps(summary), flush=True)
    return 0
