"""`arflow bench data`: SequenceStream throughput next to raw fsspec byte reading of the same shards.

Stream MB/s counts the stored shard bytes behind the samples it delivers (sequences/s x K x mean
stored bytes per sample); raw MB/s reads every shard whole with fsspec `cat_file`, pass after
pass. The two alternate in short slices so both see the same machine load. Without --manifest it writes digits shards to a temp folder AND to a moto S3 server it starts
on 127.0.0.1, and reports both. Goal: stream >= 0.7x raw.
"""
from __future__ import annotations

import json
import sys
import time


def add_arguments(parser) -> None:
    parser.add_argument("--manifest", default=None, help="shard folder / manifest URL (default: build digits shards)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--k", type=int, default=5, help="images per sequence")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the stream")
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per side and store")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="for the built digits shards")


class RawReader:
    """Reads every shard whole via fsspec cat_file, pass after pass."""

    def __init__(self, url: str, options: dict):
        from arflow_scale.data import read_manifest
        from arflow_scale.data.storage import filesystem

        manifest = read_manifest(url, options)
        self.fs = filesystem(manifest.url, options)[0]
        self.paths = [filesystem(manifest.shard_url(s), options)[1] for s in manifest.shards]
        self.next_shard, self.bytes, self.seconds = 0, 0, 0.0
        self.fs.cat_file(self.paths[0])  # warm the connection, like the stream's first batch

    def run_for(self, seconds: float) -> None:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            self.bytes += len(self.fs.cat_file(self.paths[self.next_shard]))
            self.next_shard = (self.next_shard + 1) % len(self.paths)
        self.seconds += time.perf_counter() - start


class StreamReader:
    """Iterates a SequenceStream (after one warm-up batch)."""

    def __init__(self, url: str, options: dict, args):
        from arflow_scale.data import SequenceStream

        self.stream = SequenceStream(url, k=args.k, batch_size=args.batch_size, num_workers=args.num_workers,
                                     storage_options=options)
        self.bytes_per_sample = self.stream.manifest.total_bytes / self.stream.manifest.num_samples
        self.iterator = iter(self.stream)
        next(self.iterator)
        self.sequences, self.seconds, self.args = 0, 0.0, args

    def run_for(self, seconds: float) -> None:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(self.iterator)
            self.sequences += self.args.batch_size
        self.seconds += time.perf_counter() - start


def bench_one(name: str, url: str, options: dict, args, rounds: int = 4) -> dict:
    """Raw and stream reading measured in alternating slices, so both see the same machine load."""
    raw, stream = RawReader(url, options), StreamReader(url, options, args)
    for _ in range(rounds):
        raw.run_for(args.seconds / rounds)
        stream.run_for(args.seconds / rounds)
    raw_mbps = raw.bytes / raw.seconds / 1e6
    seqs = stream.sequences / stream.seconds
    stream_mbps = seqs * args.k * stream.bytes_per_sample / 1e6
    ratio = stream_mbps / raw_mbps
    print(f"{name:>6}: stream {seqs:9.1f} seq/s {stream_mbps:8.2f} MB/s | raw fsspec {raw_mbps:8.2f} MB/s | "
          f"ratio {ratio:.3g} (goal >= 0.7)", file=sys.stderr)
    return {"store": name, "url": url, "stream_sequences_per_s": round(seqs, 1),
            "stream_MBps": round(stream_mbps, 3), "raw_MBps": round(raw_mbps, 3),
            "ratio": float(f"{ratio:.3g}"), "stream_epochs": stream.stream.epoch}


def run(args) -> int:
    import os
    import tempfile

    from arflow_scale.cli.data import parse_storage_options
    from arflow_scale.data import write_shards

    options = parse_storage_options(args.storage_option)
    common = {"k": args.k, "batch_size": args.batch_size, "num_workers": args.num_workers}
    if args.manifest:
        results = [bench_one("given", args.manifest, options, args)]
        print(json.dumps({"benchmark": "data", **common, "results": results}))
        return 0
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3_options = {"endpoint_url": f"http://{host}:{port}"}
        with tempfile.TemporaryDirectory(prefix="arflow-bench-data-") as tmp:
            local_url = f"{tmp}/digits"
            s3_url = "s3://arflow-bench/digits"
            from arflow_scale.data.storage import filesystem

            filesystem(s3_url, s3_options)[0].mkdir("arflow-bench")
            for url, opts in ((local_url, {}), (s3_url, s3_options)):
                write_shards("digits", url, samples_per_shard=args.samples_per_shard, progress=False,
                             storage_options=opts)
            results = [bench_one("local", local_url, {}, args), bench_one("s3", s3_url, s3_options, args)]
    finally:
        server.stop()
    print(json.dumps({"benchmark": "data", "source": "digits", **common, "results": results}))
    return 0
