"""Write class-grouped WebDataset shards (one class per shard) plus manifest.json, to any fsspec URL.

Layout: `<out>/shards/c<class:04d>-<n:05d>.tar`, each sample `<key>.png` (or `.npy` with an
encoder, e.g. `latents.VaeShardEncoder`) and `<key>.cls`, key `<class:04d>_<source index:08d>`;
`<out>/manifest.json` is written LAST, so a folder with a manifest is complete. Shards stream
through webdataset.TarWriter straight into fsspec file objects while a wrapper counts bytes and
computes sha256 and CRC-32.
"""
from __future__ import annotations

import hashlib
import io
import logging
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .manifest import MANIFEST_NAME, LatentEncoding, Manifest, ShardInfo
from .sources import load_source
from .storage import filesystem, join_url, list_files, with_retries, write_bytes

log = logging.getLogger(__name__)
# (uint8 images (N, H, W, C), their source indices (N,)) -> array-like (N, ...) latents
Encoder = Callable[[np.ndarray, np.ndarray], Any]


class _HashingWriter:
    """File-like object forwarding writes to `target` while counting bytes and hashing them."""

    def __init__(self, target):
        self.target = target
        self.sha256 = hashlib.sha256()
        self.crc32 = 0
        self.size = 0

    def write(self, data) -> int:
        self.target.write(data)
        self.sha256.update(data)
        self.crc32 = zlib.crc32(data, self.crc32)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.target.flush()


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, C) with C in {1, 3, 4} -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _to_numpy(batch: Any) -> np.ndarray:
    if hasattr(batch, "detach"):  # a torch tensor from an encoder
        batch = batch.detach().cpu().numpy()
    return np.asarray(batch)


VAL_SEED = 0  # the held-out samples of a class are a seeded choice: the same folder, the same split


def held_out(labels: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """Bool (N,): `per_class` samples of every class held out for validation (a fixed seeded choice; a class
    keeps at least one training sample)."""
    mask = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(VAL_SEED)
    for cls in range(num_classes):
        indices = np.flatnonzero(labels == cls)
        take = min(per_class, max(len(indices) - 1, 0))
        mask[rng.choice(indices, size=take, replace=False)] = True
    return mask


def _shard_plan(labels: np.ndarray, num_classes: int, samples_per_shard: int,
                min_shards_per_class: int = 1, val_mask: np.ndarray | None = None
                ) -> list[tuple[int, int, np.ndarray, str]]:
    """-> [(class, shard number within class, source indices, split)], each shard one class and one split.

    Shards of `samples_per_shard` (the last one shorter); a class that would get fewer than
    `min_shards_per_class` shards is split into that many nearly equal ones instead (never more
    shards than samples), so that many loader workers can each stream whole shards of it. Held-out
    samples (`val_mask`) go into one validation shard per class.
    """
    val_mask = np.zeros(len(labels), dtype=bool) if val_mask is None else val_mask
    plan = []
    for cls in range(num_classes):
        if not (labels == cls).any():  # a class without images gets no shard; the manifest keeps its name
            continue
        held = np.flatnonzero((labels == cls) & val_mask)
        if len(held):
            plan.append((cls, 0, held, "val"))
        indices = np.flatnonzero((labels == cls) & ~val_mask)
        if -(-len(indices) // samples_per_shard) >= min_shards_per_class:
            parts = [indices[start: start + samples_per_shard] for start in range(0, len(indices), samples_per_shard)]
        else:
            parts = np.array_split(indices, min(min_shards_per_class, len(indices)))
        plan.extend((cls, n, part, "train") for n, part in enumerate(parts))
    return plan


def _prepare_destination(out_url: str, overwrite: bool, storage_options: dict | None, retries: int,
                         backoff: float) -> None:
    """Refuse a non-empty destination unless overwrite; with overwrite remove our old files."""
    existing = list_files(out_url, storage_options, retries=retries, backoff=backoff)
    if not existing:
        return
    if not overwrite:
        raise ValueError(f"{out_url}: destination is not empty ({len(existing)} files, e.g. "
                         f"{sorted(existing)[0]!r}); pass overwrite=True (--overwrite) to replace it")
    fs, path = filesystem(out_url, storage_options)
    ours = [MANIFEST_NAME] + sorted(n for n in existing if n.startswith("shards/") and n.endswith(".tar"))
    for name in ours:  # manifest first: a half-replaced folder never looks complete
        if name in existing:
            with_retries(lambda n=name: fs.rm(f"{path.rstrip('/')}/{n}"), join_url(out_url, name),
                         retries=retries, backoff=backoff, what="delete")


def _encode_samples(images: list[np.ndarray], indices: np.ndarray, cls: int, encoder: Encoder | None,
                    latents: LatentEncoding | None) -> tuple[list[bytes], tuple, str]:
    """One shard's member payloads (.npy latents with `encoder`, else PNG), the stored sample shape and dtype."""
    if encoder is not None:
        encoded = _to_numpy(encoder(np.stack(images), indices))
        if len(encoded) != len(images):
            raise ValueError(f"encoder returned {len(encoded)} latents for {len(images)} images")
        if latents is not None and tuple(encoded.shape[1:]) != latents.stored_shape:
            raise ValueError(f"class {cls}: encoder returned latents of shape {tuple(encoded.shape[1:])}, "
                             f"its encoding says {latents.stored_shape}")
        return [encode_npy(e) for e in encoded], tuple(encoded.shape[1:]), str(encoded.dtype)
    if any(im.shape != images[0].shape for im in images):
        raise ValueError(f"class {cls}: images of different shapes; pass image_size to resize")
    return ([encode_png(im) for im in images], (images[0].shape[2], images[0].shape[0], images[0].shape[1]),
            "uint8")


def _check_write_arguments(samples_per_shard: int, min_shards_per_class: int, workers: int, val_per_class: int,
                           encoder: Encoder | None, latents: LatentEncoding | None) -> None:
    """Refuse `write_shards` arguments that cannot describe a data set, naming the argument."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if min_shards_per_class < 1:
        raise ValueError(f"min_shards_per_class must be >= 1, got {min_shards_per_class}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if val_per_class < 0:
        raise ValueError(f"val_per_class must be >= 0, got {val_per_class}")
    if latents is not None and encoder is None:
        raise ValueError("a latent encoding to record needs the encoder that makes it")


def _write_tar(fs: Any, path: str, cls: int, indices: np.ndarray, payloads: list[bytes], ext: str) -> _HashingWriter:
    """Write one shard's tar to `path` on `fs` (keys `<class>_<index>`, fixed mtime: byte-identical reruns);
    -> the sink that counted its bytes and hashes."""
    import webdataset as wds

    with fs.open(path, "wb") as f:
        sink = _HashingWriter(f)
        writer = wds.TarWriter(sink, encoder=False, mtime=0)  # int: no per-file PAX header
        for i, payload in zip(indices, payloads):
            writer.write({"__key__": f"{cls:04d}_{int(i):08d}", ext: payload, "cls": str(cls).encode()})
        writer.close()
    return sink


def write_shards(source: Any, out_url: str, *, path: str | None = None, image_size: int | None = None,
                 samples_per_shard: int = 1000, min_shards_per_class: int = 1, workers: int = 1,
                 overwrite: bool = False, storage_options: dict | None = None, encoder: Encoder | None = None,
                 latents: LatentEncoding | None = None, val_per_class: int = 0, progress: bool = True,
                 retries: int = 5, retry_backoff: float = 0.5, split: str = "train") -> dict:
    """Write `source` (name or object with class_names/labels/image(i)) as shards; -> manifest dict.

    With `encoder`, each shard's images uint8 (N, H, W, C) and source indices are encoded to latents
    stored as .npy; `latents` (the encoder's `encoding`) is recorded in the manifest, and every
    encoded sample must have its stored shape.
    `min_shards_per_class`: at least this many shards per class (see `_shard_plan`); set it to the
    loader workers of the runs that will read the data (ranks x data.num_workers), so that none of
    them reads whole shards to keep a share of their samples.
    `val_per_class`: that many samples of every class (a fixed seeded choice) go into validation shards
    (`split: val` in the manifest), which training never streams.
    `split`: the source's published split to read (`test` for fashion-mnist), recorded in the manifest.
    """
    _check_write_arguments(samples_per_shard, min_shards_per_class, workers, val_per_class, encoder, latents)
    src = load_source(source, path=path, image_size=image_size, split=split) if isinstance(source, str) else source
    labels = np.asarray(src.labels, dtype=np.int64)
    class_names = list(src.class_names)
    if len(labels) == 0:
        raise ValueError(f"source {getattr(src, 'name', source)!r} has no samples")
    _prepare_destination(out_url, overwrite, storage_options, retries, retry_backoff)
    fs, root = filesystem(out_url, storage_options)
    fs.makedirs(f"{root.rstrip('/')}/shards", exist_ok=True)
    ext = "npy" if encoder is not None else "png"
    val_mask = held_out(labels, len(class_names), val_per_class)
    plan = _shard_plan(labels, len(class_names), samples_per_shard, min_shards_per_class, val_mask)

    def write_one(cls: int, number: int, indices: np.ndarray, split: str) -> tuple[ShardInfo, tuple, str]:
        images = [src.image(int(i)) for i in indices]
        payloads, shape, dtype = _encode_samples(images, indices, cls, encoder, latents)
        rel = f"shards/{'c' if split == 'train' else 'v'}{cls:04d}-{number:05d}.tar"
        url = join_url(out_url, rel)

        def write() -> ShardInfo:
            sink = _write_tar(fs, f"{root.rstrip('/')}/{rel}", cls, indices, payloads, ext)
            return ShardInfo(path=rel, cls=cls, count=len(indices), bytes=sink.size,
                             sha256=sink.sha256.hexdigest(), crc32=sink.crc32, split=split)

        return with_retries(write, url, retries=retries, backoff=retry_backoff, what="write"), shape, dtype

    results = []
    with tqdm(total=len(labels), desc=f"shards -> {out_url}", unit="img", disable=not progress) as bar:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(write_one, *item) for item in plan]
            for future in futures:
                info, shape, dtype = future.result()
                results.append((info, shape, dtype))
                bar.update(info.count)
    shapes = {(s, d) for _, s, d in results}
    if len(shapes) != 1:
        raise ValueError(f"samples of different shapes/dtypes across shards: {sorted(shapes)}")
    (shape, dtype), = shapes
    manifest = Manifest(class_names=class_names, sample_shape=shape, dtype=dtype, sample_ext=ext,
                        shards=[info for info, _, _ in results],
                        source={"name": source if isinstance(source, str) else getattr(src, "name", "custom"),
                                "path": str(Path(path).resolve()) if path else None,  # fid ref reads it again
                                "image_size": image_size, "samples_per_shard": samples_per_shard,
                                "min_shards_per_class": min_shards_per_class,
                                "split": split,
                                "val_per_class": val_per_class, "encoded": encoder is not None},
                        url=out_url, latents=latents)
    write_bytes(join_url(out_url, MANIFEST_NAME), manifest.to_json().encode(), storage_options,
                retries=retries, backoff=retry_backoff)
    log.info("wrote %d shards (%d samples, %d classes) to %s", len(manifest.shards),
             manifest.num_samples, manifest.num_classes, out_url)
    return manifest.to_dict()
