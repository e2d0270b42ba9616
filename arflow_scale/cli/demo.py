"""`arflow demo`: the README's first command. Digits shards -> local Ray -> 2 CPU workers, ZeRO-2 ->
sample grid -> where the MLflow store is and how to open it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def register(sub) -> None:
    parser = sub.add_parser("demo", help="train a tiny ARFlow on digits with 2 CPU workers (a few minutes)")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="demo config (default: configs/demo.yaml)")
    parser.add_argument("--out", default="runs", help="folder for shards, runs and the MLflow store")
    parser.add_argument("--name", default=None, help="run name (default: demo-<timestamp>)")
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance of the final grid")
    parser.add_argument("--fid-samples", type=int, default=256,
                        help="images for the closing FID, sampled and measured as Ray tasks (0: no FID)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    from arflow_scale.checkpoint import load_ema_weights, run_task
    from arflow_scale.config import load_config
    from arflow_scale.eval.grids import sample_grid, save_png
    from arflow_scale.eval.reference import image_set_stats
    from arflow_scale.model.decoder import Decoder
    from arflow_scale.tasks import SampleSettings
    from arflow_scale.train.driver import train
    from arflow_scale.train.launch_plan import prepare_inputs

    out = Path(args.out).resolve()
    name = args.name or time.strftime("demo-%Y%m%d-%H%M%S")
    store = out / "mlflow.db"
    fid_overrides = []
    if args.fid_samples > 0:
        ref = out / "data" / f"digits_ref_{args.fid_samples}.npz"
        fid_overrides = ["eval.fid_at_end=true", f"eval.ref_stats={ref}", f"eval.num_samples={args.fid_samples}"]
    cfg = load_config(args.config, [f"data.manifest={out / 'data' / 'digits'}", f"run.storage_path={out}",
                                    f"run.name={name}", f"tracking.uri=sqlite:///{store}", *fid_overrides,
                                    *args.overrides])
    cfg = prepare_inputs(cfg)  # the digits shards, written once
    if cfg.eval.fid_at_end and cfg.eval.ref_stats and not Path(cfg.eval.ref_stats).exists():
        print(f"arflow demo: reference FID statistics of {cfg.eval.num_samples} digits -> {cfg.eval.ref_stats}",
              flush=True)
        image_set_stats(cfg.data.manifest, num=cfg.eval.num_samples,
                        inception_path=cfg.eval.inception_path).save(cfg.eval.ref_stats)
    print(f"arflow demo: {cfg.cluster.num_workers} workers, ZeRO-{cfg.train.zero_stage}, {cfg.train.steps} steps, "
          f"model {cfg.model.size} on {cfg.data.manifest}", flush=True)
    started = time.perf_counter()
    result = train(cfg, verbose=args.verbose)
    seconds = time.perf_counter() - started
    run_cfg, ema = load_ema_weights(result.checkpoint)
    task = run_task(run_cfg)
    labels = [label for _ in range(2) for label in range(task.num_classes)]
    settings = SampleSettings(sampler="ode", steps=cfg.train.sample_steps, cfg_scale=args.cfg_scale,
                              temperature=cfg.eval.temperature)
    grid = sample_grid(task, task.model_from_weights(ema), labels, settings, Decoder.for_model(run_cfg.model, "cpu"),
                       seed=cfg.train.seed, nrow=task.num_classes)
    grid_path = str(out / name / "samples.png")
    save_png(grid, grid_path)
    print(f"trained {result.final_step} steps in {seconds:.0f} s, final loss {result.final_loss:.4f}")
    print(f"checkpoint:  {result.checkpoint}")
    print(f"sample grid: {grid_path} (EMA weights, classes 0-9 twice, cfg scale {args.cfg_scale})")
    for step, fid in sorted(result.fid.items()):
        if "error" in fid:
            print(f"FID at step {step} failed: {fid['error']}")
            continue
        print(f"FID at step {step}: {fid['fid']:.2f} ({fid['n']} samples vs {cfg.eval.num_samples} reference "
              f"digits; small-sample FID, comparable only between runs of the same size)")
    print(f"MLflow store: {store}")
    print(f"open the dashboard: mlflow ui --backend-store-uri sqlite:///{store} --host 127.0.0.1 --port 5000")
    print(json.dumps({**result.to_json(), "sample_grid": grid_path, "seconds": round(seconds, 1)}), flush=True)
    return 0
