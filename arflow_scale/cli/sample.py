"""`arflow sample --checkpoint URL --labels 0,1,2 --out grid.png`: an EMA sample grid from a checkpoint,
decoded to pixels by the run's VAE when it models latents."""
from __future__ import annotations

import json

from arflow_scale.cli.options import (add_guided_channels_option, add_storage_option, guided_channels,
                                     parse_storage_options)
from arflow_scale.config import EvalConfig


def register(sub) -> None:
    parser = sub.add_parser("sample", help="draw an EMA sample grid from a checkpoint or exported weights")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder URL, run folder (its latest), or an exported .safetensors")
    parser.add_argument("--labels", required=True, help="comma-separated class ids, one image each")
    parser.add_argument("--out", required=True, help="PNG path or URL")
    parser.add_argument("--sampler", choices=("ode", "sde"), default=EvalConfig.sampler)
    parser.add_argument("--steps", type=int, default=EvalConfig.steps)
    parser.add_argument("--cfg-scale", type=float, default=EvalConfig.cfg_scale)
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature (FARMER; 1.0 is exact; default: the run's eval.temperature)")
    add_guided_channels_option(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nrow", type=int, default=None, help="images per grid row (default: up to 10)")
    parser.add_argument("--raw", action="store_true", help="use the raw training weights instead of the EMA")
    parser.add_argument("--eager", action="store_true",
                        help="run the sampling steps eagerly (default: compiled, in CUDA graphs, on a GPU)")
    add_storage_option(parser)
    parser.set_defaults(handler=handle)


def parse_labels(text: str) -> list[int]:
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--labels {text!r}: expected comma-separated integers like 0,1,2") from None
    if not labels:
        raise ValueError("--labels: give at least one class id")
    return labels


def handle(args) -> int:
    import torch

    from arflow_scale.checkpoint import load_ema_weights, load_exported, load_raw_weights, run_task
    from arflow_scale.eval.grids import sample_grid, save_png
    from arflow_scale.model.decoder import Decoder
    from arflow_scale.model.precision import use_tf32
    from arflow_scale.tasks import SampleSettings

    labels = parse_labels(args.labels)
    if args.temperature is not None and args.temperature < 0:
        raise ValueError(f"--temperature: must be >= 0, got {args.temperature}")
    options = parse_storage_options(args.storage_option)
    if args.checkpoint.endswith(".safetensors"):
        cfg, ema, raw = load_exported(args.checkpoint)
        weights = raw if args.raw else ema
    else:
        cfg, weights = load_ema_weights(args.checkpoint, options)
        if args.raw:
            weights = load_raw_weights(args.checkpoint, options)
    task = run_task(cfg, options)  # a distillation stage reads its teacher too
    bad = [label for label in labels if not 0 <= label < task.num_classes]
    if bad:
        raise ValueError(f"--labels: {bad} outside 0..{task.num_classes - 1} (model.num_classes)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    use_tf32(cfg.train.tf32, device)
    model = task.model_from_weights(weights, device)
    settings = SampleSettings(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                              guided_channels=guided_channels(args.guided_channels, cfg.eval.guided_channels),
                              temperature=cfg.eval.temperature if args.temperature is None else args.temperature,
                              compile=False if args.eager else EvalConfig.compile_sampler)
    grid = sample_grid(task, model, labels, settings, Decoder.for_model(cfg.model, device), seed=args.seed,
                       nrow=args.nrow)
    save_png(grid, args.out, options)
    print(json.dumps({"out": args.out, "labels": labels, "sampler": args.sampler, "steps": args.steps,
                      "cfg_scale": args.cfg_scale, "temperature": settings.temperature,
                      "guided_channels": settings.guided_channels, "vae": cfg.model.vae, "seed": args.seed}),
          flush=True)
    return 0
