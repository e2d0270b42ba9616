"""`arflow train --config configs/X.yaml [--address ADDR] [dotted.key=value ...]`: one training run.

The last stdout line is one JSON object: final_step, final_loss, params_sha256, ema_sha256,
checkpoint, mlflow_run_id, mlflow_tracking_uri.
"""
from __future__ import annotations

import json


def register(sub) -> None:
    parser = sub.add_parser("train", help="train ARFlow on Ray Train + DeepSpeed (resumes a run of the same name)")
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    from arflow_scale.config import load_config
    from arflow_scale.train import train

    cfg = load_config(args.config, args.overrides)
    result = run_and_release(train, cfg, address=args.address)
    print(json.dumps(result), flush=True)
    return 0


def run_and_release(fn, *args, **kwargs):
    """Run `fn`; shut Ray down afterwards if it was not running before (so that no worker log line
    is streamed after our JSON line)."""
    import ray

    started_here = not ray.is_initialized()
    try:
        return fn(*args, **kwargs)
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
