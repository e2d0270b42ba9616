"""Image sets for FID: a folder of PNG/JPEG files (optionally ADM-center-cropped to one size), an .npz
(`arr_0` NHWC uint8, or `images`), or a shard folder (its manifest) written by `arflow data shards`: the
images of a PNG shard folder, the source images a latent shard folder was encoded from (the manifest's
`source`, at its encoding's image size). Everything becomes uint8 RGB (N, H, W, 3).
"""
from __future__ import annotations

import io
from typing import Iterator, Optional

import numpy as np
from einops import rearrange, repeat
from PIL import Image

from arflow_scale.data.decode import tar_members
from arflow_scale.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from arflow_scale.data.sources import SOURCES, center_crop, load_source
from arflow_scale.data.storage import filesystem, join_url, list_files, read_bytes, write_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
NPZ_KEYS = ("arr_0", "images")


def as_uint8_rgb(array: np.ndarray, source: str = "<array>") -> np.ndarray:
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3} -> (N, H, W, 3); grey replicated."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8, got {array.dtype}")
    if array.ndim == 3:
        array = rearrange(array, "n h w -> n h w 1")
    if array.ndim != 4:
        raise ValueError(f"{source}: expected images (N, H, W, C), got shape {array.shape}")
    if array.shape[-1] not in (1, 3) and array.shape[1] in (1, 3):
        array = rearrange(array, "n c h w -> n h w c")
    if array.shape[-1] not in (1, 3):
        raise ValueError(f"{source}: images need 1 or 3 channels, got shape {array.shape}")
    if array.shape[-1] == 1:
        array = repeat(array, "n h w 1 -> n h w c", c=3)
    return np.ascontiguousarray(array)


def decode_image(data: bytes, name: str = "<image>", image_size: Optional[int] = None) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 3); with `image_size`, ADM's center crop to that side (as the
    shard writer's sources crop)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
            return center_crop(rgb, image_size) if image_size else np.asarray(rgb, dtype=np.uint8)
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds
        raise ValueError(f"{name}: not a readable image ({err})") from None


def spread_indices(total: int, limit: Optional[int]) -> list[int]:
    """All of 0..total-1, or `limit` of them evenly spread (class-sorted sets keep every class's share)."""
    if limit is None or limit >= total:
        return list(range(total))
    return [(i * total) // limit for i in range(limit)]


def source_kind(source: str, storage_options: Optional[dict] = None) -> str:
    """'npz', 'manifest' or 'folder' for an image-set URL."""
    if source.rstrip("/").endswith(".npz"):
        return "npz"
    if source.rstrip("/").endswith(MANIFEST_NAME):
        return "manifest"
    fs, path = filesystem(source, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"{source}: image set not found (expected a PNG folder, an .npz or a shard folder)")
    if fs.isfile(path):
        raise ValueError(f"{source}: not an image set: expected a folder of images, an .npz or a shard manifest")
    _, manifest_path = filesystem(join_url(source, MANIFEST_NAME), storage_options)
    return "manifest" if fs.exists(manifest_path) else "folder"


def _iter_npz(source: str, storage_options: Optional[dict]) -> Iterator[np.ndarray]:
    try:
        with np.load(io.BytesIO(read_bytes(source, storage_options)), allow_pickle=False) as npz:
            key = next((k for k in NPZ_KEYS if k in npz.files), None)
            if key is None:
                raise ValueError(f"{source}: no images in this .npz: expected key 'arr_0' or 'images', "
                                 f"found {npz.files}")
            images = npz[key]
    except (OSError, EOFError) as err:
        raise ValueError(f"{source}: not a readable .npz ({err})") from None
    yield as_uint8_rgb(images, f"{source}[{key}]")


def _iter_folder(source: str, limit: Optional[int], storage_options: Optional[dict],
                 image_size: Optional[int]) -> Iterator[np.ndarray]:
    """Every image file under the folder (sub-folders too, e.g. ImageNet's root/<class>/), in name order;
    `limit` of them evenly spread."""
    names = sorted(n for n in list_files(source, storage_options) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f"{source}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    for index in spread_indices(len(names), limit):
        url = join_url(source, names[index])
        yield rearrange(decode_image(read_bytes(url, storage_options), url, image_size), "h w c -> 1 h w c")


def _iter_recorded_source(manifest: Manifest, limit: Optional[int]) -> Iterator[np.ndarray]:
    """The images a latent shard folder was encoded from, read again from the source its manifest records
    and resized as the writer resized them (FID references are images, never decoded latents)."""
    record, size = manifest.source, manifest.latents.image_size
    name, path = str(record.get("name") or ""), record.get("path")
    kind, _, named_path = name.partition(":")  # a source object's name, e.g. "imagefolder:/data/train"
    path = path or named_path or None
    if kind not in SOURCES or (kind in ("imagefolder", "npz") and not path):
        raise ValueError(f"{manifest.url}: latent shards whose manifest does not record where their source "
                         f"images are (source {record}); compute the reference statistics from the images: "
                         f"arflow fid ref --data IMAGE_FOLDER --image-size {size}")
    src = load_source(kind, path, image_size=size)
    for index in spread_indices(len(src), limit):
        yield as_uint8_rgb(src.image(index)[None], f"{name}[{index}]")


def shard_quotas(counts: list[int], limit: Optional[int]) -> list[int]:
    """Images to take from each shard: all, or `limit` spread in proportion (largest remainder)."""
    total = sum(counts)
    if limit is None or limit >= total:
        return list(counts)
    exact = np.asarray(counts, dtype=np.float64) * (limit / total)
    quotas = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[: limit - int(quotas.sum())]] += 1
    return [int(q) for q in quotas]


def _iter_manifest(source: str, limit: Optional[int], storage_options: Optional[dict]) -> Iterator[np.ndarray]:
    """Images of a shard folder, each shard read with retries and checked against its manifest sha256
    (reference statistics must not silently include a damaged shard)."""
    import hashlib

    manifest = read_manifest(source, storage_options)
    if manifest.latents is not None:
        yield from _iter_recorded_source(manifest, limit)
        return
    if manifest.sample_ext != "png":
        raise ValueError(f"{source}: shards hold {manifest.sample_ext} samples without a recorded encoding, not "
                         f"images; compute the reference statistics from the source images: "
                         f"arflow fid ref --data IMAGE_FOLDER --image-size N")
    # Shards are class-grouped: a subset takes a proportional share of every shard, so classes stay balanced.
    for shard, quota in zip(manifest.shards, shard_quotas([s.count for s in manifest.shards], limit)):
        if quota == 0:
            continue
        url = manifest.shard_url(shard)
        data = read_bytes(url, storage_options)
        if len(data) != shard.bytes or hashlib.sha256(data).hexdigest() != shard.sha256:
            raise ValueError(f"{url}: shard does not match its manifest (size or sha256); "
                             f"check it with `arflow data inspect {source} --verify`")
        pngs = [m for m in tar_members(data, url) if m["fname"].endswith(".png")]
        for member in pngs[:quota]:
            yield rearrange(decode_image(member["data"], f"{url}:{member['fname']}"), "h w c -> 1 h w c")


def iter_image_batches(source: str, batch_size: int = 256, limit: Optional[int] = None,
                       storage_options: Optional[dict] = None, image_size: Optional[int] = None
                       ) -> Iterator[np.ndarray]:
    """uint8 RGB batches (B, H, W, 3) of an image set, at most `limit` images in all; `image_size`: center
    crop an image folder's images to this side (only for folders)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image size must be >= 1, got {image_size}")
    kind = source_kind(source, storage_options)
    if image_size and kind != "folder":
        raise ValueError(f"{source}: an image size applies to a folder of images only (a shard folder or an "
                         f".npz holds images of one size; latent shards use the size they were encoded at)")
    if kind == "npz":
        pieces = _iter_npz(source, storage_options)
    elif kind == "manifest":
        pieces = _iter_manifest(source, limit, storage_options)
    else:
        pieces = _iter_folder(source, limit, storage_options, image_size)
    pending: list[np.ndarray] = []
    pending_count, emitted, shape = 0, 0, None
    for piece in pieces:
        shape = shape or piece.shape[1:]
        if piece.shape[1:] != shape:
            raise ValueError(f"{source}: images differ in size ({shape} and {piece.shape[1:]}); "
                             f"FID needs one size per set (center crop them with an image size)")
        if limit is not None:
            piece = piece[: limit - emitted - pending_count]
        pending.append(piece)
        pending_count += len(piece)
        while pending_count >= batch_size:
            merged = np.concatenate(pending)
            yield merged[:batch_size]
            emitted += batch_size
            pending, pending_count = [merged[batch_size:]], len(merged) - batch_size
        if limit is not None and emitted + pending_count >= limit:
            break
    if pending_count:
        yield np.concatenate(pending)


def load_images(source: str, limit: Optional[int] = None, storage_options: Optional[dict] = None) -> np.ndarray:
    """The whole image set as uint8 RGB (N, H, W, 3)."""
    return np.concatenate(list(iter_image_batches(source, batch_size=4096, limit=limit,
                                                  storage_options=storage_options)))


def save_npz(images: np.ndarray, url: str, storage_options: Optional[dict] = None) -> None:
    """Write uint8 (N, H, W, 3) as an ADM-evaluator-compatible samples file (`arr_0`)."""
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=as_uint8_rgb(images, url))
    write_bytes(url, buffer.getvalue(), storage_options)
