"""`arflow train --config configs/X.yaml [--address ADDR] [dotted.key=value ...]`: one training run.

Progress goes to stderr (one line per log interval, or a bar on a terminal); the last stdout line is one
JSON object: final_step, final_loss, params_sha256, ema_sha256, checkpoint, mlflow_run_id,
mlflow_tracking_uri, images_per_s, classes_trained (and fid / val_loss when measured). Exit codes: 2 for a
configuration or data error found before anything starts, 3 when another `arflow train` holds the run folder,
1 for a run stopped by a non-finite loss or gradient (the error names the step), 130 / 143 for a run stopped by
Ctrl-C / SIGTERM (the first checkpoints a step soon after, a second stops at once: train/stop.py).
`--dry-run` runs the same checks, prints the launch plan (train/launch_plan.py) as the last JSON line and exits 0
(2 on a configuration or data error) without starting Ray or writing anything.
"""
from __future__ import annotations

import json
import sys
from typing import Optional

EXIT_RUN_IN_USE = 3


def register(sub) -> None:
    parser = sub.add_parser("train", help="train on Ray Train + DeepSpeed (resumes a run of the same name)")
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/demo.yaml")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, data and run folder, print what the launch would do (start, resume "
                             "or finished; batches, FLOPs, data) and stop: no Ray, nothing written")
    parser.add_argument("--mfu", type=float, default=None,
                        help="with --dry-run: the MFU to assume for a GPU-hours estimate (e.g. 0.35)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="with --mfu: dense bf16 peak TFLOP/s per GPU (default: train.peak_tflops)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    from arflow_scale.config import load_config
    from arflow_scale.train.driver import train
    from arflow_scale.train.run_lock import RunLockHeld
    from arflow_scale.train.nonfinite import NonFiniteError

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        return dry_run(cfg, args.mfu, args.peak_tflops)
    if args.mfu is not None or args.peak_tflops is not None:
        raise ValueError("--mfu and --peak-tflops estimate GPU-hours for --dry-run only (train.peak_tflops sets "
                         "the peak of the logged MFU)")
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


def dry_run(cfg, mfu: Optional[float] = None, peak_tflops: Optional[float] = None) -> int:
    """Print the checked launch plan of `cfg` (a line for people on stderr, the JSON summary last on stdout); with
    an assumed `mfu`, GPU-hours and hours on the most workers at `peak_tflops` (default `train.peak_tflops`)."""
    from arflow_scale.scaling.design import GpuSpec
    from arflow_scale.train.launch_plan import plan_launch, prepare_inputs, shards_to_prepare

    peak = peak_tflops if peak_tflops is not None or mfu is None else cfg.train.peak_tflops
    if (mfu is None) != (peak is None):
        raise ValueError("a GPU-hours estimate needs --mfu and a peak (--peak-tflops or train.peak_tflops) together")
    gpu = GpuSpec(peak, mfu)
    gpu.validate()

    cfg = prepare_inputs(cfg, write=False)
    pending = shards_to_prepare(cfg)
    plan = plan_launch(cfg, read_data=not pending)
    summary = plan.summary(shards_pending=pending)
    flops = plan.train_flops_to_go
    if gpu.enabled:
        gpu_hours = gpu.hours(flops)
        summary.update(gpu_hours=gpu_hours, hours=gpu_hours / cfg.cluster.worker_range[1],
                       assumed_peak_tflops=gpu.peak_tflops, assumed_mfu=gpu.mfu)
    what = {"start": "would start a new run",
            "resume": f"would resume from step {plan.start_step} of {plan.latest_url}",
            "finished": f"is finished (step {plan.start_step}: {plan.latest_url})"}[plan.action]
    print(f"arflow train --dry-run: {plan.run_url} {what}; {plan.steps_to_train} steps to train, {flops:.3g} "
          f"training FLOPs"
          + (f" ({summary['gpu_hours']:.4g} GPU-hours, {summary['hours']:.3g} h on {cfg.cluster.worker_range[1]} "
             f"GPUs at {gpu.peak_tflops:g} TFLOP/s x MFU {gpu.mfu:g})" if gpu.enabled else "")
          + (f"; writes {cfg.run.prepare_data} shards to {cfg.data.manifest} first" if pending else ""),
          file=sys.stderr, flush=True)
    print(json.dumps(summary), flush=True)
    return 0
