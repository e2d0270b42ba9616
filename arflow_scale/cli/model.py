"""`arflow model info`: parameter count, forward FLOPs and geometry of a model size of either family."""
from __future__ import annotations

import json

# Per-family defaults of the geometry flags: ARFlow on SD-VAE latents of 256x256 images, FARMER on pixels.
FAMILY_DEFAULTS = {
    "arflow": {"size": "XL/2", "image_size": 32, "in_channels": 4, "k": 5},
    "farmer": {"size": "XL/16", "image_size": 256, "in_channels": 3, "k": 1},
}


def register(sub) -> None:
    parser = sub.add_parser("model", help="model sizes: parameters, FLOPs, tokens")
    model_sub = parser.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    info = model_sub.add_parser("info", help="print one JSON object describing a model size")
    info.add_argument("--family", choices=tuple(FAMILY_DEFAULTS), default="arflow")
    info.add_argument("--size", default=None,
                      help="NAME/PATCH; ARFlow: tiny, S, B, L, XL, custom (default XL/2); FARMER: tiny, S, B, L, XL "
                           "(default XL/16)")
    info.add_argument("--image-size", type=int, default=None, help="image (or latent) side (default 32; FARMER 256)")
    info.add_argument("--in-channels", type=int, default=None,
                      help="3 for pixels, 4 for SD-VAE latents (default 4; FARMER 3)")
    info.add_argument("--k", type=int, default=None, help="images per sequence (ARFlow; default 5)")
    info.add_argument("--num-classes", type=int, default=1000)
    info.add_argument("--attention", default="hybrid", help="hybrid, full or intra (ARFlow)")
    info.add_argument("--depth", type=int, default=None, help="override the registry depth (ARFlow)")
    info.add_argument("--width", type=int, default=None, help="override the registry width (ARFlow)")
    info.add_argument("--heads", type=int, default=None, help="override the registry heads (ARFlow)")
    info.add_argument("--mlp-ratio", type=float, default=4.0)
    info.set_defaults(handler=info_command)


def model_info(cfg) -> dict:
    """Analytic description of an ARFlow ModelConfig (no weights are built)."""
    from arflow_scale.model import count_parameters, forward_flops, resolve

    d = resolve(cfg)
    flops = forward_flops(d)
    return {
        "family": "arflow", "size": cfg.size, "depth": d.depth, "width": d.width, "heads": d.heads,
        "head_dim": d.head_dim, "patch": d.patch, "in_channels": d.in_channels, "image_size": d.image_size, "k": d.k,
        "num_classes": d.num_classes, "attention": d.attention, "mlp_hidden": d.mlp_hidden,
        "params": count_parameters(d), "forward_flops": flops, "train_flops": 3 * flops,
        "tokens_per_image": d.tokens_per_image, "sequence_length": d.sequence_length,
    }


def farmer_model_info(cfg) -> dict:
    """Analytic description of a FARMER ModelConfig: flow, prior and student parameters, FLOPs per image
    (docs/farmer.md §9) and the sequential steps of sampling one image (§7)."""
    from arflow_scale.model import farmer_flops as flops
    from arflow_scale.model.config import farmer_args_of

    a = farmer_args_of(cfg)
    forward = flops.forward_flops(a)
    shape = ("flow_blocks", "flow_depth", "flow_width", "flow_heads", "prior_depth", "prior_width", "prior_heads",
             "mixture_components", "informative_channels", "student_depth")
    return {
        "family": "farmer", "size": cfg.size, "patch": a.patch, "in_channels": a.in_channels,
        "image_size": a.image_size, "num_classes": a.num_classes, "tokens_per_image": a.num_tokens,
        "token_dim": a.token_dim, **{key: getattr(a, key) for key in shape},
        "flow_params": flops.flow_parameters(a), "prior_params": flops.prior_parameters(a),
        "params": flops.count_parameters(a), "forward_flops": forward, "train_flops": 3 * forward,
        "student_params": flops.count_student_parameters(a), "student_forward_flops": flops.student_forward_flops(a),
        "sample_steps_prior": a.num_tokens + (1 if a.redundant_channels else 0),
        "sample_steps_flow_inverse": a.flow_blocks * (a.num_tokens - 1),
    }


def info_command(args) -> int:
    from arflow_scale.model import model_config

    defaults = FAMILY_DEFAULTS[args.family]
    overrides = {"family": args.family, "num_classes": args.num_classes, "attention": args.attention,
                 "mlp_ratio": args.mlp_ratio}
    for key in ("image_size", "in_channels", "k"):
        overrides[key] = getattr(args, key) if getattr(args, key) is not None else defaults[key]
    for key in ("depth", "width", "heads"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    cfg = model_config(args.size or defaults["size"], **overrides)
    print(json.dumps(farmer_model_info(cfg) if cfg.family == "farmer" else model_info(cfg)))
    return 0
