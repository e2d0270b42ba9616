"""`arflow train --config configs/X.yaml [--address ADDR] [dotted.key=value ...]`: one training run.

Progress goes to stderr (one line per log interval, or a bar on a terminal); the last stdout line is one
JSON object: final_step, final_loss, params_sha256, ema_sha256, checkpoint, mlflow_run_id,
mlflow_tracking_uri, images_per_s, classes_trained (and fid / val_loss when measured). Exit codes: 2 for a
configuration or data error found before anything starts, 3 when another `arflow train` holds the run folder,
1 for a run stopped by a non-finite loss or gradient (the error names the step), 130 / 143 for a run stopped by
Ctrl-C / SIGTERM (the first checkpoints a step soon after, a second stops at once: train/stop.py).
"""
from __future__ import annotations

import json
import sys

EXIT_RUN_IN_USE = 3


def register(sub) -> None:
    parser = sub.add_parser("train", help="train on Ray Train + DeepSpeed (resumes a run of the same name)")
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    from arflow_scale.config import load_config
    from arflow_scale.train.driver import train
    from arflow_scale.train.run_lock import RunLockHeld
    from arflow_scale.train.nonfinite import NonFiniteError

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, address=args.address, verbose=args.verbose)
    except RunLockHeld as err:
        print(f"arflow train: {err}", file=sys.stderr)
        return EXIT_RUN_IN_USE
    except NonFiniteError as err:
        print(f"arflow train: training diverged: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json()), flush=True)
    return 0
