"""Decoding shard bytes: tar members (a fast path for our USTAR files, webdataset for any other tar),
.npy samples, PNG samples. Bad bytes raise `CorruptShard`, which the stream counts and skips."""
from __future__ import annotations

import functools
import io

import numpy as np


class CorruptShard(ValueError):
    """A shard's bytes do not match its manifest entry or cannot be decoded."""


def _padded(size: int) -> int:
    """Bytes a tar member of `size` bytes occupies after its header (whole 512-byte blocks)."""
    return (size + 511) // 512 * 512


def _ustar_header(data: bytes, pos: int) -> tuple[str, int] | None:
    """The plain USTAR regular-file header at `pos` -> (name, size); None for anything else."""
    if data[pos + 156: pos + 157] not in (b"0", b"\0") or data[pos + 257: pos + 262] != b"ustar" \
            or data[pos + 124] & 0x80:
        return None
    size = int(data[pos + 124: pos + 136].split(b"\0", 1)[0].strip() or b"0", 8)
    name = data[pos: pos + 100].split(b"\0", 1)[0].decode()
    prefix = data[pos + 345: pos + 500].split(b"\0", 1)[0]
    return (f"{prefix.decode()}/{name}" if prefix else name), size


def _ustar_members(data: bytes, url: str, check_headers: bool = True) -> list[dict] | None:
    """Regular files of a plain USTAR archive (what our writer makes); None if anything else.

    Member data are zero-copy memoryview slices of `data`. `check_headers=False` skips the
    per-header checksums (the caller has verified the whole shard's checksum already).
    """
    view = memoryview(data)
    members, pos, end_of_data = [], 0, len(data)
    while pos + 512 <= end_of_data:
        head = _ustar_header(data, pos)
        if head is None:
            return None if data[pos: pos + 512] != bytes(512) else members  # zero block = end of archive
        if check_headers:
            header = data[pos: pos + 512]
            if int(header[148:156].split(b"\0", 1)[0] or b"0", 8) != sum(header) - sum(header[148:156]) + 256:
                raise CorruptShard(f"bad tar header checksum at byte {pos}")
        name, size = head
        start = pos + 512
        if start + size > end_of_data:
            raise CorruptShard(f"tar member {name} runs past the end of the shard (truncated)")
        members.append({"fname": name, "data": view[start: start + size], "__url__": url})
        pos = start + _padded(size)
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


def uniform_npy_block(data: bytes, shape: tuple[int, ...], cls: int, count: int) -> np.ndarray | None:
    """A verified .npy shard whose `count` samples are laid out alike -> (count, *shape) view of `data`.

    Our writer's latent shards are `count` records of equal size, each `<key>.cls` then `<key>.npy`
    with the same sizes, the same .npy header and the same class. That is checked here with a few
    whole-shard array comparisons instead of parsing 2 x count tar members in Python (most of a
    latent stream's per-sample cost). Anything else (other layouts, fields, keys, a class or shape
    that does not match) -> None, and the general path decodes the shard or names what is wrong.
    Header checksums are not checked: only for shards whose checksum matched the manifest.
    """
    members, pos = {}, 0  # suffix -> (header offset in the record, size); record = first key's members
    key = None
    while pos + 512 <= len(data) and (head := _ustar_header(data, pos)) is not None:
        name_key, suffix = split_key(head[0])
        if key not in (None, name_key):
            break
        if "/" in head[0] or suffix in members:
            return None
        key = name_key
        members[suffix] = (pos, head[1])
        pos += 512 + _padded(head[1])
    stride = pos
    if key is None or set(members) != {"cls", "npy"} or len(data) < count * stride + 1024 \
            or data.count(0, count * stride) != len(data) - count * stride:  # end of archive: zero blocks
        return None
    records = np.frombuffer(data, np.uint8, count * stride).reshape(count, stride)
    (cls_at, cls_size), (npy_at, npy_size) = members["cls"], members["npy"]
    if npy_size < 12 or data[npy_at + 512: npy_at + 518] != b"\x93NUMPY" or data[npy_at + 518] not in (1, 2):
        return None
    wide = data[npy_at + 518] == 2
    npy_header = 10 + 2 * wide + int.from_bytes(data[npy_at + 520: npy_at + 522 + 2 * wide], "little")
    try:
        stored_shape, dtype, fortran, offset, elements = _npy_layout(data[npy_at + 512: npy_at + 512 + npy_header])
        label = int(data[cls_at + 512: cls_at + 512 + cls_size])
    except Exception:  # noqa: BLE001 - not a plain .npy / number: the general path reports it
        return None
    if tuple(stored_shape) != tuple(shape) or fortran or offset + elements * dtype.itemsize != npy_size \
            or label != cls:
        return None
    width = len(key)
    # Byte ranges every record holds exactly as the first one does: per member header the name after
    # the key (same length and suffix), size, type, magic and prefix; then the class and .npy header.
    header_fields = ((width, 100), (124, 136), (156, 157), (257, 265), (345, 500))
    shared = [(at + a, at + b) for at in (cls_at, npy_at) for a, b in header_fields]
    shared += [(cls_at + 512, cls_at + 512 + cls_size), (npy_at + 512, npy_at + 512 + offset)]
    keys = records[:, cls_at: cls_at + width]
    if not all((records[:, a:b] == records[0, a:b]).all() for a, b in shared) \
            or not (keys == records[:, npy_at: npy_at + width]).all() \
            or ((keys == ord(".")) | (keys == ord("/")) | (keys == 0)).any() \
            or not (keys[1:] != keys[:-1]).any(axis=1).all():  # a new key per record
        return None
    start = npy_at + 512 + offset
    return records[:, start: start + elements * dtype.itemsize].view(dtype).reshape(count, *shape)


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
    if ext == "npy" and not check_headers:
        block = uniform_npy_block(data, shape, cls, count)
        if block is not None:  # one copy per sample, so no view keeps the whole shard alive
            return [sample.copy() for sample in block[positions.start: positions.stop: positions.step]]
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
