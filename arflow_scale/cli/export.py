"""`arflow export --checkpoint URL --out model.safetensors`: consolidated EMA (and raw) weights."""
from __future__ import annotations

import json

from arflow_scale.cli.options import add_storage_option, parse_storage_options


def register(sub) -> None:
    parser = sub.add_parser("export", help="write consolidated EMA + raw weights of a checkpoint (any ZeRO stage)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder URL, or a run folder (its latest)")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--no-raw", action="store_true", help="EMA weights only")
    add_storage_option(parser)
    parser.set_defaults(handler=handle)


def handle(args) -> int:
    from arflow_scale.checkpoint import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.out, parse_storage_options(args.storage_option),
                             include_raw=not args.no_raw)
    print(json.dumps(info), flush=True)
    return 0
