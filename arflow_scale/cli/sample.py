"""`arflow sample --checkpoint URL --labels 0,1,2 --out grid.png`: an EMA sample grid from a checkpoint."""
from __future__ import annotations

import json


def register(sub) -> None:
    parser = sub.add_parser("sample", help="draw an EMA sample grid from a checkpoint or exported weights")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder URL, run folder (its latest), or an exported .safetensors")
    parser.add_argument("--labels", required=True, help="comma-separated class ids, one image each")
    parser.add_argument("--out", required=True, help="PNG path or URL")
    parser.add_argument("--sampler", choices=("ode", "sde"), default="ode")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nrow", type=int, default=None, help="images per grid row (default: up to 10)")
    parser.add_argument("--raw", action="store_true", help="use the raw training weights instead of the EMA")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
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

    from arflow_scale.cli.export import parse_storage_options
    from arflow_scale.train.checkpoint import load_ema_weights, load_raw_weights
    from arflow_scale.train.export import draw_grid, load_exported, model_from_weights, save_png

    labels = parse_labels(args.labels)
    options = parse_storage_options(args.storage_option)
    if args.checkpoint.endswith(".safetensors"):
        cfg, ema, raw = load_exported(args.checkpoint)
        weights = raw if args.raw else ema
    else:
        cfg, weights = load_ema_weights(args.checkpoint, options)
        if args.raw:
            weights = load_raw_weights(args.checkpoint, options)
    bad = [label for label in labels if not 0 <= label < cfg.model.num_classes]
    if bad:
        raise ValueError(f"--labels: {bad} outside 0..{cfg.model.num_classes - 1} (model.num_classes)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model_from_weights(cfg, weights, device)
    grid = draw_grid(model, labels, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                     seed=args.seed, nrow=args.nrow)
    save_png(grid, args.out, options)
    print(json.dumps({"out": args.out, "labels": labels, "sampler": args.sampler, "steps": args.steps,
                      "cfg_scale": args.cfg_scale, "seed": args.seed}), flush=True)
    return 0
