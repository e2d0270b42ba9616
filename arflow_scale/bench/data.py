"""`arflow bench data`: SequenceStream throughput next to raw fsspec byte reading of the same shards.

Both sides count STORED shard bytes. Raw reads every shard whole with fsspec `cat_file`, round-robin
(`raw_read.RawReader`): once with one reader (the goal's reference), and once with the stream's
concurrency (one reader per DataLoader worker process, times the stream's fetch threads) when that is
more than one. Stream MB/s = samples delivered/s x mean stored bytes per sample (tar overhead
included, as raw). A third side, the codec ceiling (`DecodeCeiling`), does the stream's per-shard
checks and decoding on shards held in memory: when it is below the raw rate (PNG on few cores), no
reader that decodes can reach the goal, and the stream is also reported against min(raw, ceiling).
The sides alternate in slices (raw, matched, ceiling, stream, stream, ceiling, matched, raw, ...) in
one run, so all see the same machine load.

Without --manifest the benchmark writes one shard set to a temp folder (default: float32 4x32x32
latent-like arrays, the sample the ImageNet-256 recipe streams; `--format png` for images), copies
the identical files to an S3 endpoint (a `python -m moto.server` subprocess on 127.0.0.1, a free
port), and reports both. The local folder is read with its pages dropped from the page cache after
every read (`--page-cache drop`, both sides), so local numbers are disk reads; `--page-cache keep`
measures against a memcpy from RAM instead. Goal: stream >= 0.7x raw.
"""
from __future__ import annotations

import json
import sys
import time

from arflow_scale.config.data import DataConfig

from .sides import BenchSide

SOURCES = ("synthetic", "digits", "fashion-mnist")
FORMATS = {"latent": 32, "npy": 64, "png": 64}  # -> default --image-size


def add_arguments(parser) -> None:
    parser.add_argument("--manifest", default=None, help="shard folder / manifest URL (default: build shards)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--k", type=int, default=5, help="images per sequence")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the stream")
    parser.add_argument("--prefetch", type=int, default=DataConfig.prefetch,
                        help="stream units prefetched in the background (default: the data config's)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per side and store")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of raw and stream per store")
    parser.add_argument("--source", choices=SOURCES, default="synthetic", help="data for the built shards")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"side of the built samples (default per format: {FORMATS})")
    parser.add_argument("--format", choices=tuple(FORMATS), default="latent",
                        help="built samples: float32 (4, S, S) latent-like .npy arrays, uint8 (3, S, S) .npy "
                             "arrays, or PNG images")
    parser.add_argument("--page-cache", choices=("drop", "keep"), default="drop",
                        help="local folder: drop each shard's pages after every read (disk reads) or keep them")
    parser.add_argument("--samples-per-class", type=int, default=300, help="synthetic: images per class")
    parser.add_argument("--samples-per-shard", type=int, default=150, help="for the built shards")


def synthetic_source(per_class: int, size: int, seed: int = 0):
    """10 classes of photo-like RGB images: a smooth random colour field plus sensor-like noise
    (PNG stores them at about 0.7x their raw size, like natural photos)."""
    import numpy as np
    from PIL import Image

    from arflow_scale.data.sources import ArraySource

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    coarse = rng.integers(0, 256, (len(labels), 6, 6, 3), dtype=np.uint8)
    images = np.empty((len(labels), size, size, 3), np.uint8)
    for i, field in enumerate(coarse):
        smooth = np.asarray(Image.fromarray(field).resize((size, size), Image.BICUBIC), np.float32)
        images[i] = np.clip(smooth + rng.normal(0.0, 6.0, smooth.shape), 0, 255).astype(np.uint8)
    return ArraySource(images, labels, [f"class{c}" for c in range(10)], name="synthetic")


def rgb_source(name: str, size: int):
    """digits / fashion-mnist resized to `size`, grey replicated to RGB."""
    import numpy as np

    from arflow_scale.data.sources import ArraySource, load_source

    src = load_source(name, image_size=size)
    images = np.stack([src.image(i) for i in range(len(src.labels))])
    return ArraySource(np.repeat(images, 3, axis=-1), src.labels, src.class_names, name=name)


def chw_pixels(images, indices=None):
    """Identity 'encoder' for --format npy: uint8 (N, H, W, C) -> uint8 (N, C, H, W); indices unused."""
    from einops import rearrange

    return rearrange(images, "n h w c -> n c h w")


def latent_like(images, indices=None):
    """'Encoder' for --format latent: uint8 (N, S, S, 3) -> float32 (N, 4, S, S), a fixed 3 -> 4 channel
    mix standardized to unit variance: the dtype, shape and bytes of SD-VAE latents (not a VAE); indices unused."""
    import numpy as np
    from einops import einsum

    mix = np.random.default_rng(1234).normal(size=(3, 4)).astype(np.float32)
    latents = einsum(images.astype(np.float32) / 127.5 - 1.0, mix, "n h w c, c d -> n d h w")
    return ((latents - latents.mean()) / latents.std()).astype(np.float32)


ENCODERS = {"latent": latent_like, "npy": chw_pixels, "png": None}


class StreamReader:
    """Iterates a SequenceStream (after one warm-up batch)."""

    def __init__(self, url: str, options: dict, args):
        from arflow_scale.data import SequenceStream

        self.stream = SequenceStream.open(url, k=args.k, batch_size=args.batch_size, num_workers=args.num_workers,
                                     storage_options=options, prefetch=args.prefetch)
        manifest = self.stream.manifest
        self.bytes_per_sample = manifest.total_bytes / manifest.num_samples
        self.iterator = iter(self.stream)
        next(self.iterator)
        self.sequences, self.seconds, self.args = 0, 0.0, args

    def run_for(self, seconds: float) -> None:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(self.iterator)
            self.sequences += self.args.batch_size
        self.seconds += time.perf_counter() - start

    def close(self) -> None:
        self.iterator.close()  # stops the prefetch thread / DataLoader workers


class DecodeCeiling(BenchSide):
    """The stream's per-shard work (size and checksum checks, decoding) on shards held in memory, in as
    many threads as the stream fetches with: what any reader that decodes could deliver on this
    machine, storage aside. (At most `max_shards` shards are held.)"""

    def __init__(self, url: str, options: dict, threads: int, max_shards: int = 8):
        from arflow_scale.data.consumer import verify_and_decode
        from arflow_scale.data.manifest import read_manifest

        from .raw_read import shard_paths
        from .sides import ShardLoop

        manifest = read_manifest(url, options)
        fs, paths, _ = shard_paths(url, options)
        held = [fs.cat_file(path) for path in paths[:max_shards]]

        def decode(i: int) -> int:
            verify_and_decode(held[i], manifest, i, range(manifest.shards[i].count), DataConfig.verify_checksums)
            return len(held[i])

        self.loop, self.threads = ShardLoop(decode, len(held), threads), threads

    def _slice(self, seconds: float) -> tuple[int, float]:
        return self.loop.run_for(seconds)


def bench_one(name: str, url: str, options: dict, args, note: str) -> dict:
    """Stream, raw reading and the codec ceiling in alternating slices (raw, matched, ceiling, stream,
    stream, ceiling, matched, raw, ...).

    raw: one fsspec reader, shard after shard (the goal's reference); matched: as many concurrent
    readers as the stream has fetching (only when that is more than one); ceiling: `DecodeCeiling`.
    """
    from arflow_scale.data.prefetch import fetch_threads

    from .raw_read import RawReader  # registers the page-cache-dropping filesystem, for this benchmark only

    threads = fetch_threads(args.prefetch)
    sides = {"raw": RawReader(url, options)}
    try:
        if max(args.num_workers, 1) * threads > 1:
            sides["matched"] = RawReader(url, options, processes=args.num_workers, threads=threads)
        sides["ceiling"] = DecodeCeiling(url, options, max(args.num_workers, 1) * threads)
        sides["stream"] = StreamReader(url, options, args)
        order = list(sides.values())
        piece = args.seconds / args.rounds
        for r in range(args.rounds):
            for side in (order if r % 2 == 0 else order[::-1]):
                side.run_for(piece)
    finally:
        for side in sides.values():
            side.close()
    raw, matched, ceiling, stream = sides["raw"], sides.get("matched"), sides["ceiling"], sides["stream"]
    manifest = stream.stream.manifest
    seqs = stream.sequences / stream.seconds
    stream_mbps = seqs * args.k * stream.bytes_per_sample / 1e6
    ratio = stream_mbps / raw.mbps
    bound = min(raw.mbps, ceiling.mbps)
    # Prefetched units may be prepared while the raw side runs: an upper bound of that head start.
    head_start = min(1.0, args.rounds * args.prefetch * max(args.num_workers, 1) * manifest.total_bytes
                     / len(manifest.shards) / max(stream.sequences * args.k * stream.bytes_per_sample, 1.0))
    verdict = "met" if ratio >= 0.7 else "NOT met"
    lines = [f"{name:>6}: stream {seqs:8.1f} seq/s {stream_mbps:8.2f} MB/s stored | raw fsspec {raw.mbps:8.2f} MB/s "
             f"stored | ratio {ratio:.3g} (goal >= 0.7: {verdict})"]
    if matched:
        lines.append(f"vs {matched.readers} concurrent raw readers ({matched.mbps:.2f} MB/s): "
                     f"{stream_mbps / matched.mbps:.3g}")
    lines.append(f"codec ceiling (checks + decoding from memory, {ceiling.threads} threads): {ceiling.mbps:.2f} MB/s"
                 f"{'; below 0.7x raw: the goal is out of reach on this machine' if ceiling.mbps < 0.7 * raw.mbps else ''}"
                 f"; stream vs min(raw, ceiling): {stream_mbps / bound:.3g}")
    print("\n        ".join(lines + [note]), file=sys.stderr)
    result = {"store": name, "url": url, "note": note, "stream_sequences_per_s": round(seqs, 1),
              "stream_MBps": round(stream_mbps, 3), "raw_MBps": round(raw.mbps, 3),
              "ratio": float(f"{ratio:.3g}"), "goal_met": ratio >= 0.7,
              "ceiling_MBps": round(ceiling.mbps, 3), "ceiling_threads": ceiling.threads,
              "ratio_to_bound": float(f"{stream_mbps / bound:.3g}"),
              "raw_passes": round(raw.bytes / manifest.total_bytes, 1), "stream_epochs": stream.stream.epoch,
              "prefetch_head_start_max": round(head_start, 3)}
    if matched:
        result.update({"matched_readers": matched.readers, "matched_MBps": round(matched.mbps, 3),
                       "matched_ratio": float(f"{stream_mbps / matched.mbps:.3g}")})
    return result


def start_moto_server() -> tuple:
    """`python -m moto.server` on 127.0.0.1 with a free port -> (process, endpoint URL)."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server on 127.0.0.1:{port} did not start (exit {proc.poll()})")
            time.sleep(0.2)


def stop_process(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except Exception:  # noqa: BLE001 - still running: kill it
        proc.kill()
        proc.wait(timeout=10)


def build_source(args):
    if args.source == "synthetic":
        return synthetic_source(args.samples_per_class, args.image_size)
    return rgb_source(args.source, args.image_size)


def run(args) -> int:
    import os
    import tempfile
    import uuid

    from arflow_scale.data.storage import parse_storage_options
    from arflow_scale.data import write_shards
    from arflow_scale.data.storage import filesystem

    options = parse_storage_options(args.storage_option)
    common = {"k": args.k, "batch_size": args.batch_size, "num_workers": args.num_workers,
              "prefetch": args.prefetch, "seconds": args.seconds}
    if args.manifest:
        results = [bench_one("given", args.manifest, options, args, "page cache state unknown")]
        print(json.dumps({"benchmark": "data", **common, "results": results}))
        return 0
    args.image_size = args.image_size or FORMATS[args.format]
    if args.image_size < 8:
        raise ValueError(f"--image-size must be >= 8, got {args.image_size}")
    src = build_source(args)
    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    server, endpoint = start_moto_server()
    try:
        s3_options = {"endpoint_url": endpoint}
        with tempfile.TemporaryDirectory(prefix="arflow-bench-data-") as tmp:
            local_url = f"{tmp}/shards"
            manifest = write_shards(src, local_url, samples_per_shard=args.samples_per_shard, progress=False,
                                    encoder=ENCODERS[args.format])
            bucket = f"arflow-bench-{uuid.uuid4().hex[:8]}"
            s3_url = f"s3://{bucket}/shards"
            s3 = filesystem(s3_url, s3_options)[0]
            s3.mkdir(bucket)
            s3.put(f"{local_url}/", f"{bucket}/shards/", recursive=True)  # the identical files
            samples = sum(s["count"] for s in manifest["shards"])
            stored = sum(s["bytes"] for s in manifest["shards"])
            shape = "x".join(map(str, manifest["sample_shape"]))
            print(f"data: {args.source} {args.format} {shape} {manifest['dtype']}, {samples} samples in "
                  f"{len(manifest['shards'])} shards, {stored / 1e6:.1f} MB stored ({stored / samples / 1e3:.1f} kB "
                  f"per sample)", file=sys.stderr)
            from .raw_read import COLD_PROTOCOL

            cold = args.page_cache == "drop"
            results = [bench_one("local", f"{COLD_PROTOCOL}://{local_url}" if cold else local_url, {}, args,
                                 "disk reads: pages dropped after every read (both sides)" if cold
                                 else "page cache kept: raw is a memcpy from RAM"),
                       bench_one("s3", s3_url, s3_options, args, "moto server subprocess on 127.0.0.1")]
    finally:
        stop_process(server)
    print(json.dumps({"benchmark": "data", "source": args.source, "format": args.format, "image_size": args.image_size,
                      "page_cache": args.page_cache, "samples": samples, "stored_MB": round(stored / 1e6, 2),
                      **common, "results": results}))
    return 0
