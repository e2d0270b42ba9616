"""`arflow export --checkpoint URL --out model.safetensors`: consolidated EMA (and raw) weights."""
from __future__ import annotations

import json


def register(sub) -> None:
    parser = sub.add_parser("export", help="write consolidated EMA + raw weights of a checkpoint (any ZeRO stage)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder URL, or a run folder (its latest)")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--no-raw", action="store_true", help="EMA weights only")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option, e.g. endpoint_url=http://127.0.0.1:9000")
    parser.set_defaults(handler=handle)


def parse_storage_options(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--storage-option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        options[key] = value
    return options


def handle(args) -> int:
    from arflow_scale.train.export import export_checkpoint

    info = export_checkpoint(args.checkpoint, args.out, parse_storage_options(args.storage_option),
                             include_raw=not args.no_raw)
    print(json.dumps(info), flush=True)
    return 0
