"""Decoding shard bytes: tar members (a fast path for our USTAR files, webdataset for any other tar),
.npy samples, PNG samples. Bad bytes raise `CorruptShard`, which the stream counts and skips."""
from __future__ import annotations

import functools
import io

import numpy as np


class CorruptShard(ValueError):
    """A shard's bytes do not match its manifest entry or cannot be decoded."""


def _ustar_members(data: bytes, url: str, check_headers: bool = True) -> list[dict] | None:
    """Regular files of a plain USTAR archive (what our writer makes); None if anything else.

    Member data are zero-copy memoryview slices of `data`. `check_headers=False` skips the
    per-header checksums (the caller has verified the whole shard's sha256 already).
    """
    view = memoryview(data)
    members, pos, end_of_data = [], 0, len(data)
    while pos + 512 <= end_of_data:
        if data[pos + 156: pos + 157] not in (b"0", b"\0") or data[pos + 257: pos + 262] != b"ustar" \
                or data[pos + 124] & 0x80:
            return None if data[pos: pos + 512] != bytes(512) else members  # zero block = end of archive
        if check_headers:
            header = data[pos: pos + 512]
            if int(header[148:156].split(b"\0", 1)[0] or b"0", 8) != sum(header) - sum(header[148:156]) + 256:
                raise CorruptShard(f"bad tar header checksum at byte {pos}")
        size = int(data[pos + 124: pos + 136].split(b"\0", 1)[0].strip() or b"0", 8)
        name = data[pos: pos + 100].split(b"\0", 1)[0].decode()
        prefix = data[pos + 345: pos + 500].split(b"\0", 1)[0]
        start = pos + 512
        if start + size > end_of_data:
            raise CorruptShard(f"tar member {name} runs past the end of the shard (truncated)")
        members.append({"fname": f"{prefix.decode()}/{name}" if prefix else name,
                        "data": view[start: start + size], "__url__": url})
        pos = start + (size + 511) // 512 * 512
    return members


def split_key(fname: str) -> tuple[str | None, str | None]:
    """'dir/key.ext.gz' -> ('dir/key', 'ext.gz'): webdataset's base_plus_ext without the regex (a
    third of a stream's per-sample cost on small samples); odd names go to base_plus_ext itself."""
    slash = fname.rfind("/") + 1
    dot = fname.find(".", slash)
    if dot <= slash:
        from webdataset.tariterators import base_plus_ext

        return base_plus_ext(fname)
    return fname[:dot], fname[dot + 1:]


def tar_members(data: bytes, url: str, check_headers: bool = True) -> list[dict]:
    """Tar bytes -> [{"fname", "data" (bytes-like), "__url__"}] for webdataset's group_by_keys.

    Plain USTAR headers are parsed directly (Python's tarfile costs ~50 us per member, most of a
    stream's time on small images); any other tar goes through webdataset's tar_file_iterator.
    """
    members = _ustar_members(data, url, check_headers)
    if members is None:
        from webdataset import tariterators

        members = [{**f, "__url__": url} for f in tariterators.tar_file_iterator(io.BytesIO(data))]
    return members


@functools.lru_cache(maxsize=64)
def _npy_layout(header: bytes) -> tuple[tuple[int, ...], np.dtype, bool, int, int]:
    """An .npy file's header bytes -> (shape, dtype, fortran order, data offset, element count),
    parsed by numpy."""
    buf = io.BytesIO(header)
    version = np.lib.format.read_magic(buf)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(buf)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed in .npy samples")
    return shape, dtype, fortran, buf.tell(), int(np.prod(shape, dtype=np.int64))


def load_npy(data: bytes | memoryview) -> np.ndarray:
    """.npy bytes -> array, like np.load(allow_pickle=False); the header parse is cached (every
    sample of a shard has the same one), the data is a read-only view of `data`."""
    if data[:6] != b"\x93NUMPY" or len(data) < 12 or data[6] not in (1, 2):
        return np.load(io.BytesIO(data), allow_pickle=False)  # other versions; numpy's own errors
    header_len = int.from_bytes(data[8:10], "little") if data[6] == 1 else int.from_bytes(data[8:12], "little")
    shape, dtype, fortran, offset, count = _npy_layout(bytes(data[:(10 if data[6] == 1 else 12) + header_len]))
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f".npy data holds {len(data) - offset} bytes, header needs {count * dtype.itemsize}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


def decode_sample(sample: dict, ext: str, shape: tuple[int, ...]) -> np.ndarray:
    """Tar sample -> uint8 (H, W, C) image or the stored latent array (its own memory, not a view of
    the shard); checks the shape."""
    if ext == "png":
        from PIL import Image

        with Image.open(io.BytesIO(sample["png"]), formats=("PNG",)) as img:
            arr = np.asarray(img)
        arr = arr[..., None] if arr.ndim == 2 else arr
        ok = arr.shape == (shape[1], shape[2], shape[0])
    else:
        arr = np.array(load_npy(sample["npy"]))  # a copy: a view would keep the whole shard alive
        ok = arr.shape == tuple(shape)
    if not ok:
        raise CorruptShard(f"sample {sample.get('__key__')} has shape {arr.shape}, manifest says {shape}")
    return arr


def decode_shard(data: bytes, url: str, ext: str, shape: tuple[int, ...], cls: int, count: int,
                 positions: range, check_headers: bool = True) -> list[np.ndarray]:
    """A shard's bytes -> its decoded samples at `positions` (see `decode_sample`).

    Raises CorruptShard (or the decoder's own error) if the shard does not hold `count` samples of
    class `cls` with `ext` files of `shape`, so a bad shard is refused before any of it is used.
    """
    from webdataset import tariterators

    samples = list(tariterators.group_by_keys(tar_members(data, url, check_headers), keys=split_key))
    if len(samples) != count:
        raise CorruptShard(f"{len(samples)} samples, manifest says {count}")
    out = []
    for pos in positions:
        sample = samples[pos]
        if ext not in sample or "cls" not in sample or int(bytes(sample["cls"])) != cls:
            raise CorruptShard(f"sample {sample['__key__']} is not a {ext} sample of class {cls}")
        out.append(decode_sample(sample, ext, shape))
    return out
