"""`arflow data shards|inspect`: write class-grouped shards + manifest; inspect / verify a shard folder.

Each command ends with one JSON line on stdout.
"""
from __future__ import annotations

import json
import time

from arflow_scale.cli.options import add_storage_option, parse_storage_options
from arflow_scale.data.sources import SOURCES


def register(sub) -> None:
    parser = sub.add_parser("data", help="write and inspect class-grouped WebDataset shards")
    data_sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    shards = data_sub.add_parser("shards", help="write one-class-per-shard WebDataset shards + manifest.json")
    shards.add_argument("--source", required=True, choices=SOURCES, help="dataset source")
    shards.add_argument("--out", required=True, help="destination URL: folder, file://, s3://bucket/prefix")
    shards.add_argument("--path", default=None, help="source path (fashion-mnist dir, imagefolder root, .npz)")
    shards.add_argument("--image-size", type=int, default=None, help="resize / ADM center crop to this size")
    shards.add_argument("--samples-per-shard", type=int, default=1000)
    shards.add_argument("--min-shards-per-class", type=int, default=1,
                        help="split smaller classes into this many shards: the loader workers of the runs "
                             "that will read them (ranks x data.num_workers)")
    shards.add_argument("--workers", type=int, default=4, help="shards written in parallel")
    shards.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    add_storage_option(shards)
    shards.set_defaults(handler=run_shards)

    inspect = data_sub.add_parser("inspect", help="classes, counts and bytes of a shard folder")
    inspect.add_argument("url", help="shard folder URL or its manifest.json")
    inspect.add_argument("--verify", action="store_true", help="re-read every shard and check its sha256 and CRC-32")
    add_storage_option(inspect)
    inspect.set_defaults(handler=run_inspect)


def run_shards(args) -> int:
    from arflow_scale.data import StorageError, write_shards

    start = time.perf_counter()
    try:
        manifest = write_shards(args.source, args.out, path=args.path, image_size=args.image_size,
                                samples_per_shard=args.samples_per_shard,
                                min_shards_per_class=args.min_shards_per_class, workers=args.workers,
                                overwrite=args.overwrite,
                                storage_options=parse_storage_options(args.storage_option))
    except StorageError as err:
        raise ValueError(str(err)) from None
    print(json.dumps({"out": args.out, "source": args.source, "classes": len(manifest["class_names"]),
                      "shards": len(manifest["shards"]),
                      "samples": sum(s["count"] for s in manifest["shards"]),
                      "bytes": sum(s["bytes"] for s in manifest["shards"]),
                      "sample_shape": manifest["sample_shape"], "dtype": manifest["dtype"],
                      "seconds": round(time.perf_counter() - start, 3)}))
    return 0


def run_inspect(args) -> int:
    from arflow_scale.data import StorageError, read_manifest
    from arflow_scale.data.manifest import verify_shards

    options = parse_storage_options(args.storage_option)
    try:
        manifest = read_manifest(args.url, options)
        problems = verify_shards(manifest, options) if args.verify else []
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
              "sample_ext": manifest.sample_ext, "classes": classes}
    if args.verify:
        result.update(verified=len(manifest.shards) - len(problems), problems=problems, ok=not problems)
    print(json.dumps(result))
    return 1 if problems else 0
