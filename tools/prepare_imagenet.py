#!/usr/bin/env python
"""Write ImageNet (root/<class>/*.JPEG) as class-grouped WebDataset shards on any fsspec URL.

ADM's center crop and resize to --image-size; with --vae the images are encoded to SD-VAE latents
(float32 .npy, scale factor applied, on the GPU when there is one) and the manifest records the VAE's
identity. --flip-copy also stores the latents of each image's mirror image beside them (each sample
(2, c, h, w)), as the reference ARFlow caches both; the stream's flip (data.flip) then picks those
instead of mirroring latents. Example (ImageNet 256, the recipe configs/imagenet256.yaml):

    python tools/prepare_imagenet.py --root /data/imagenet/train --out s3://bucket/in256-sdvae \
        --image-size 256 --vae stabilityai/sd-vae-ft-ema --flip-copy --workers 16 \
        --storage-option endpoint_url=https://minio:9000
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from arflow_scale.cli.data import add_vae_arguments, parse_storage_options, vae_encoder_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="ImageNet train folder: root/<class>/*.JPEG")
    parser.add_argument("--out", required=True, help="destination URL (folder, file://, s3://)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--min-shards-per-class", type=int, default=32,
                        help="at least this many shards per class: the loader workers of the runs that will "
                             "read them (ranks x data.num_workers; the recipes: 32 x 1)")
    parser.add_argument("--workers", type=int, default=8)
    add_vae_arguments(parser)
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from arflow_scale.data import StorageError, write_shards

    try:
        encoder = vae_encoder_from_args(args)
        manifest = write_shards("imagefolder", args.out, path=args.root, image_size=args.image_size,
                                samples_per_shard=args.samples_per_shard,
                                min_shards_per_class=args.min_shards_per_class, workers=args.workers,
                                overwrite=args.overwrite, storage_options=parse_storage_options(args.storage_option),
                                encoder=encoder, latents=encoder.encoding if encoder else None)
    except (FileNotFoundError, ValueError, StorageError) as err:
        print(f"prepare_imagenet: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "shards": len(manifest["shards"]), "classes": len(manifest["class_names"]),
                      "sample_shape": manifest["sample_shape"], "latents": manifest["latents"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
