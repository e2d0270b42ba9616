#!/usr/bin/env python
"""Write ImageNet (root/<class>/*.JPEG) as class-grouped WebDataset shards on any fsspec URL.

ADM's center crop and resize to --image-size; optional latents through an encoder you provide
(`--encoder package.module:function`, a callable uint8 (N, H, W, C) -> latents (N, ...)), e.g. an
SD-VAE wrapper whose weights you already have on disk. Example:

    python tools/prepare_imagenet.py --root /data/imagenet/train --out s3://bucket/in128 \
        --image-size 128 --workers 16 --storage-option endpoint_url=https://minio:9000
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys


def load_encoder(spec: str):
    """`pkg.module:callable` -> the callable (imported, never evaluated from a string)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"--encoder {spec!r}: expected package.module:callable")
    return getattr(importlib.import_module(module_name), attr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="ImageNet train folder: root/<class>/*.JPEG")
    parser.add_argument("--out", required=True, help="destination URL (folder, file://, s3://)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--min-shards-per-class", type=int, default=32,
                        help="at least this many shards per class: the loader workers of the runs that will "
                             "read them (ranks x data.num_workers; the recipes: 32 x 1)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--encoder", default=None, help="package.module:callable producing latents")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from arflow_scale.data import write_shards

    options = dict(item.split("=", 1) for item in args.storage_option)
    manifest = write_shards("imagefolder", args.out, path=args.root, image_size=args.image_size,
                            samples_per_shard=args.samples_per_shard,
                            min_shards_per_class=args.min_shards_per_class, workers=args.workers,
                            overwrite=args.overwrite, storage_options=options or None,
                            encoder=load_encoder(args.encoder) if args.encoder else None)
    print(json.dumps({"out": args.out, "shards": len(manifest["shards"]),
                      "classes": len(manifest["class_names"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
