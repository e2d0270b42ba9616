"""`arflow model info`: parameter count, forward FLOPs and sequence geometry of a model size."""
from __future__ import annotations

import json


def register(sub) -> None:
    parser = sub.add_parser("model", help="model sizes: parameters, FLOPs, tokens")
    model_sub = parser.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    info = model_sub.add_parser("info", help="print one JSON object describing a model size")
    info.add_argument("--size", default="XL/2", help="NAME/PATCH with NAME in tiny, S, B, L, XL, custom")
    info.add_argument("--image-size", type=int, default=32, help="image (or latent) side")
    info.add_argument("--in-channels", type=int, default=4, help="3 for pixels, 4 for SD-VAE latents")
    info.add_argument("--k", type=int, default=5, help="images per sequence")
    info.add_argument("--num-classes", type=int, default=1000)
    info.add_argument("--attention", default="hybrid", help="hybrid, full or intra")
    info.add_argument("--depth", type=int, default=None, help="override the registry depth")
    info.add_argument("--width", type=int, default=None, help="override the registry width")
    info.add_argument("--heads", type=int, default=None, help="override the registry heads")
    info.add_argument("--mlp-ratio", type=float, default=4.0)
    info.set_defaults(handler=info_command)


def model_info(cfg) -> dict:
    """Analytic description of a ModelConfig (no weights are built)."""
    from arflow_scale.model import count_parameters, forward_flops, resolve

    d = resolve(cfg)
    flops = forward_flops(d)
    return {
        "size": cfg.size, "depth": d.depth, "width": d.width, "heads": d.heads, "head_dim": d.head_dim,
        "patch": d.patch, "in_channels": d.in_channels, "image_size": d.image_size, "k": d.k,
        "num_classes": d.num_classes, "attention": d.attention, "mlp_hidden": d.mlp_hidden,
        "params": count_parameters(d), "forward_flops": flops, "train_flops": 3 * flops,
        "tokens_per_image": d.tokens_per_image, "sequence_length": d.sequence_length,
    }


def info_command(args) -> int:
    from arflow_scale.model import model_config

    overrides = {"image_size": args.image_size, "in_channels": args.in_channels, "k": args.k,
                 "num_classes": args.num_classes, "attention": args.attention, "mlp_ratio": args.mlp_ratio}
    for key in ("depth", "width", "heads"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    cfg = model_config(args.size, **overrides)
    print(json.dumps(model_info(cfg)))
    return 0
