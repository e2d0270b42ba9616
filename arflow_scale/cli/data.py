"""`arflow data shards|inspect`: write class-grouped shards + manifest; inspect / verify a shard folder.

Each command ends with one JSON line on stdout.
"""
from __future__ import annotations

import json
import logging
import time

from arflow_scale.cli.options import add_storage_option, parse_storage_options
from arflow_scale.data.sources import SOURCES, SPLITS
from arflow_scale.model.vae_identity import ENCODE_MODES

log = logging.getLogger(__name__)


def add_vae_arguments(parser) -> None:
    """The --vae options shared by `arflow data shards` and tools/prepare_imagenet.py."""
    parser.add_argument("--vae", default=None, metavar="PATH_OR_ID",
                        help="encode to latents with this diffusers AutoencoderKL: a local folder or a hub id "
                             "(e.g. stabilityai/sd-vae-ft-ema), safetensors only; needs --image-size")
    parser.add_argument("--vae-scale-factor", type=float, default=None,
                        help="latent scale factor (default: the VAE config's scaling_factor, 0.18215 for SD)")
    parser.add_argument("--vae-encode", choices=ENCODE_MODES, default="mean",
                        help="store the posterior mean, or one seeded posterior sample per image")
    parser.add_argument("--vae-batch-size", type=int, default=None,
                        help="images per VAE call (default: arflow_scale.model.vae.DEFAULT_BATCH_SIZE)")
    parser.add_argument("--vae-seed", type=int, default=None, help="seed of --vae-encode sample (default 0)")
    parser.add_argument("--flip-copy", action="store_true",
                        help="also store the latents of each image's mirror image (samples (2, c, h, w)); "
                             "data.flip then picks them instead of mirroring latents")


def vae_encoder_from_args(args):
    """-> a data.latents.VaeShardEncoder from the --vae options, or None without --vae (VAE on CUDA if present)."""
    if not args.vae:
        options = (("--flip-copy", args.flip_copy), ("--vae-scale-factor", args.vae_scale_factor),
                   ("--vae-encode sample", args.vae_encode == "sample"), ("--vae-batch-size", args.vae_batch_size),
                   ("--vae-seed", args.vae_seed))
        given = [flag for flag, value in options if value not in (None, False)]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --vae (latent shards)")
        return None
    if not args.image_size:
        raise ValueError("--vae needs --image-size (images are resized to it, then encoded)")
    if args.vae_seed is not None and args.vae_encode != "sample":
        raise ValueError(f"--vae-seed {args.vae_seed}: only with --vae-encode sample (the mean draws nothing)")
    from arflow_scale.data.latents import VaeShardEncoder
    from arflow_scale.model.vae import LatentVAE

    vae = LatentVAE.load(args.vae, scale_factor=args.vae_scale_factor, encode_mode=args.vae_encode)
    options = {k: v for k, v in (("batch_size", args.vae_batch_size), ("seed", args.vae_seed)) if v is not None}
    encoder = VaeShardEncoder(vae, args.image_size, flip_copy=args.flip_copy, **options)
    log.info("VAE %s on %s: %dx%d images -> latents %s, scale %g, %s", vae.identity().source, vae.device,
             args.image_size, args.image_size, encoder.encoding.latent_shape, vae.scale_factor, args.vae_encode)
    return encoder


def register(sub) -> None:
    parser = sub.add_parser("data", help="write and inspect class-grouped WebDataset shards")
    data_sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    shards = data_sub.add_parser("shards", help="write one-class-per-shard WebDataset shards + manifest.json")
    shards.add_argument("--source", required=True, choices=SOURCES, help="dataset source")
    shards.add_argument("--out", required=True, help="destination URL: folder, file://, s3://bucket/prefix")
    shards.add_argument("--path", default=None, help="source path (fashion-mnist dir, imagefolder root, .npz)")
    shards.add_argument("--split", choices=SPLITS, default="train",
                        help="the source's published split (fashion-mnist: test for FID reference statistics)")
    shards.add_argument("--image-size", type=int, default=None, help="resize / ADM center crop to this size")
    shards.add_argument("--samples-per-shard", type=int, default=1000)
    shards.add_argument("--min-shards-per-class", type=int, default=1,
                        help="split smaller classes into this many shards: the loader workers of the runs "
                             "that will read them (ranks x data.num_workers)")
    shards.add_argument("--val-per-class", type=int, default=0,
                        help="hold out this many samples of every class as a validation split (never trained on)")
    shards.add_argument("--workers", type=int, default=4, help="shards written in parallel")
    shards.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    add_vae_arguments(shards)
    add_storage_option(shards)
    shards.set_defaults(handler=run_shards)

    inspect = data_sub.add_parser("inspect", help="classes, counts and bytes of a shard folder")
    inspect.add_argument("url", help="shard folder URL or its manifest.json")
    inspect.add_argument("--verify", action="store_true",
                         help="re-read every shard: size, sha256 and CRC-32, then the stream's own checks and "
                              "decoding of every sample (count, class, file type, shape)")
    inspect.add_argument("--workers", type=int, default=4, help="shards verified at once")
    add_storage_option(inspect)
    inspect.set_defaults(handler=run_inspect)


def run_shards(args) -> int:
    from arflow_scale.data import StorageError, write_shards

    start = time.perf_counter()
    options = parse_storage_options(args.storage_option)
    encoder = vae_encoder_from_args(args)
    try:
        manifest = write_shards(args.source, args.out, path=args.path, image_size=args.image_size,
                                samples_per_shard=args.samples_per_shard,
                                min_shards_per_class=args.min_shards_per_class, workers=args.workers,
                                overwrite=args.overwrite, storage_options=options, encoder=encoder,
                                val_per_class=args.val_per_class, split=args.split,
                                latents=encoder.encoding if encoder else None)
    except StorageError as err:
        raise ValueError(str(err)) from None
    print(json.dumps({"out": args.out, "source": args.source, "split": args.split,
                      "classes": len(manifest["class_names"]),
                      "shards": len(manifest["shards"]),
                      "samples": sum(s["count"] for s in manifest["shards"]),
                      "bytes": sum(s["bytes"] for s in manifest["shards"]),
                      "sample_shape": manifest["sample_shape"], "dtype": manifest["dtype"],
                      "latents": manifest["latents"], "seconds": round(time.perf_counter() - start, 3)}))
    return 0


def run_inspect(args) -> int:
    from arflow_scale.data import StorageError, read_manifest
    from arflow_scale.data.verify import verify_shards

    options = parse_storage_options(args.storage_option)
    try:
        manifest = read_manifest(args.url, options)
        problems = verify_shards(manifest, options, workers=args.workers) if args.verify else []
    except StorageError as err:
        raise ValueError(str(err)) from None
    classes = []
    for cls, name in enumerate(manifest.class_names):
        mine = [s for s in manifest.shards if s.cls == cls]
        classes.append({"id": cls, "name": name, "shards": len(mine), "samples": sum(s.count for s in mine),
                        "bytes": sum(s.bytes for s in mine)})
    result = {"url": manifest.url, "format_version": manifest.format_version,
              "num_classes": manifest.num_classes, "num_shards": len(manifest.shards),
              "num_samples": manifest.num_samples, "bytes": manifest.total_bytes,
              "sample_shape": list(manifest.sample_shape), "dtype": manifest.dtype,
              "sample_ext": manifest.sample_ext,
              "latents": manifest.latents.to_dict() if manifest.latents else None, "classes": classes}
    if args.verify:
        result.update(verified=len(manifest.shards) - len(problems), problems=problems, ok=not problems)
    print(json.dumps(result))
    return 1 if problems else 0
