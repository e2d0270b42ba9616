#!/usr/bin/env python
"""Reference FID statistics of a training set, for `eval.ref_stats` / `arflow fid model --ref`.

    python tools/fid_reference_stats.py --data s3://bucket/in128 --out s3://bucket/in128_ref.npz \
        --num 50000 --storage-option endpoint_url=https://minio:9000

    python tools/fid_reference_stats.py --data /data/imagenet/train --image-size 256 --out in256_ref.npz \
        --num 50000

Reads the shards through their manifest (latent shards: the source images their manifest records, at the
size they were encoded at) or an image folder (ADM center crop to --image-size), runs the standard FID
InceptionV3 and writes mergeable float64 statistics (count, sum, sum of outer products; `mu`/`sigma` too,
as ADM's files have). ADM's VIRTUAL_imagenet{128,256}_labeled.npz can be used as they are instead.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="shard folder / manifest URL, image folder or npz")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image folder: ADM center crop to this side first (as the shards were made)")
    parser.add_argument("--out", required=True, help="statistics .npz (local path or URL)")
    parser.add_argument("--num", type=int, default=None, help="at most this many images (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--inception", default=None, help="FID InceptionV3 TorchScript (default: packaged copy)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from arflow_scale.eval import image_set_stats

    options = dict(item.split("=", 1) for item in args.storage_option)
    started = time.time()
    stats = image_set_stats(args.data, num=args.num, batch_size=args.batch_size,
                            inception_path=args.inception, storage_options=options, image_size=args.image_size)
    stats.save(args.out, options)
    print(json.dumps({"out": args.out, "n": stats.count, "seconds": round(time.time() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
