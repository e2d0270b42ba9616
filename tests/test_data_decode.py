"""Shard decoding: the .npy reader, tar member parsing, and the whole-shard fast path for .npy shards
checked against the general (webdataset) path."""
from __future__ import annotations

import io

import numpy as np
import pytest
import webdataset as wds

from arflow_scale.data import write_shards
from arflow_scale.data.decode import CorruptShard, decode_shard, uniform_npy_block
from arflow_scale.data.writer import encode_npy
from test_data_stream import id_source

SHAPE = (2, 3, 5)  # (C, H, W) of the test latents: no two axes alike


def latents(images: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """'Encoder': uint8 (N, 4, 4, 1) id images -> float32 (N, 2, 3, 5), distinct per image."""
    ids = images[:, 1, 0, 0].astype(np.float32)
    return ids[:, None, None, None] + np.linspace(0, 1, 30, dtype=np.float32).reshape(SHAPE)


def tar_of(samples: list[dict]) -> bytes:
    """webdataset samples ({"__key__", ext: bytes}) -> tar bytes, written as the shard writer does."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    return buf.getvalue()


def npy_sample(key: str, array: np.ndarray, cls: int, **extra: bytes) -> dict:
    return {"__key__": key, "npy": encode_npy(array), "cls": str(cls).encode(), **extra}


def decode_both(data: bytes, shape, cls: int, count: int, positions: range) -> tuple[list, list]:
    """(fast path allowed: headers trusted, general path: headers checked) decodes of one shard."""
    return (decode_shard(data, "s", "npy", shape, cls, count, positions, check_headers=False),
            decode_shard(data, "s", "npy", shape, cls, count, positions, check_headers=True))


@pytest.mark.parametrize("encoder", [latents, None], ids=["float32-latents", "uint8-pixels"])
def test_uniform_block_equals_general_decode(tmp_path, encoder):
    """Our writer's .npy shards take the fast path, and it yields what the general path yields:
    the same arrays in the same order, each in its own memory (no view pins the shard)."""
    from arflow_scale.bench.data import chw_pixels

    manifest = write_shards(id_source([7, 5]), str(tmp_path), samples_per_shard=7, progress=False,
                            encoder=encoder or chw_pixels)
    shape = tuple(manifest["sample_shape"])
    for info in manifest["shards"]:
        data = (tmp_path / info["path"]).read_bytes()
        block = uniform_npy_block(data, shape, info["cls"], info["count"])
        assert block is not None and block.shape == (info["count"], *shape)
        for positions in (range(info["count"]), range(1, info["count"], 2)):
            fast, general = decode_both(data, shape, info["cls"], info["count"], positions)
            assert len(fast) == len(general) == len(positions)
            for a, b in zip(fast, general):
                assert a.dtype == b.dtype and a.shape == b.shape == shape and np.array_equal(a, b)
                assert a.flags.owndata and not np.shares_memory(a, np.frombuffer(data, np.uint8))


def test_uniform_block_declines_other_layouts():
    """Any shard not laid out record-for-record alike goes to the general path, which still decodes it
    or names what is wrong."""
    arrays = [np.full(SHAPE, i, np.float32) for i in range(4)]
    good = [npy_sample(f"k{i:03d}", a, 3) for i, a in enumerate(arrays)]
    assert uniform_npy_block(tar_of(good), SHAPE, 3, 4) is not None

    uneven_keys = tar_of([npy_sample("k" * (i + 1), a, 3) for i, a in enumerate(arrays)])
    extra_member = tar_of([{**s, "json": b"{}"} for s in good])
    for data in (uneven_keys, extra_member):  # valid shards, other layouts: decoded the general way
        assert uniform_npy_block(data, SHAPE, 3, 4) is None
        fast, general = decode_both(data, SHAPE, 3, 4, range(4))
        assert all(np.array_equal(a, b) for a, b in zip(fast, general)) and len(fast) == 4
        assert [float(a.flat[0]) for a in fast] == [0.0, 1.0, 2.0, 3.0]

    other_class = tar_of(good[:2] + [npy_sample("k002", arrays[2], 4)] + good[3:])
    other_shape = tar_of(good[:3] + [npy_sample("k003", np.zeros((2, 3, 4), np.float32), 3)])
    wrong_dtype = tar_of(good[:3] + [npy_sample("k003", np.zeros(SHAPE, np.float64), 3)])
    for data, count, message in ((other_class, 4, "not a npy sample of class 3"),
                                 (other_shape, 4, "has shape"),
                                 (tar_of(good), 5, "4 samples, manifest says 5"),
                                 (tar_of(good[:3]), 4, "3 samples, manifest says 4")):
        assert uniform_npy_block(data, SHAPE, 3, count) is None
        with pytest.raises(CorruptShard, match=message):
            decode_shard(data, "s", "npy", SHAPE, 3, count, range(count), check_headers=False)
    repeated_key = tar_of(good[:3] + [npy_sample("k002", arrays[3], 3)])
    assert uniform_npy_block(repeated_key, SHAPE, 3, 4) is None
    with pytest.raises(ValueError):  # webdataset: a duplicate file in one sample
        decode_shard(repeated_key, "s", "npy", SHAPE, 3, 4, range(4), check_headers=False)
    assert uniform_npy_block(wrong_dtype, SHAPE, 3, 4) is None  # the general path returns it as stored
    assert uniform_npy_block(tar_of(good), (2, 3, 4), 3, 4) is None  # not the manifest's shape
    assert uniform_npy_block(tar_of(good), SHAPE, 2, 4) is None  # not the manifest's class


def test_load_npy_matches_numpy():
    """The header-cached .npy reader returns what np.load returns and rejects truncated data."""
    from arflow_scale.data.decode import load_npy

    arrays = [np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.asfortranarray(np.arange(6).reshape(2, 3)),
              np.full((3, 8, 8), 7, np.uint8), np.array(2.5)]
    for array in arrays:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        out = load_npy(buf.getvalue())
        assert out.dtype == array.dtype and out.shape == array.shape and np.array_equal(out, array)
    with pytest.raises(ValueError, match="header needs"):
        load_npy(buf.getvalue()[:-4])  # the 0-d float64 without 4 of its 8 data bytes
    with pytest.raises(ValueError):
        load_npy(b"not an npy file")


def test_split_key_matches_webdataset():
    from webdataset.tariterators import base_plus_ext

    from arflow_scale.data.decode import split_key

    for name in ("k.npy", "a/b/c.tar.gz", "x.y/abc.png", "a/b/.hidden", "dir/.png", "k", ".", "a.", "a/b.",
                 "", "a//b.c", "a/.b.c", "/abs/0001.cls"):
        assert split_key(name) == base_plus_ext(name), name


def test_tar_header_checks_only_when_not_verified(tmp_path):
    """Header checksums are skipped only when the whole shard's sha256 was verified; both parses agree."""
    from arflow_scale.data.decode import CorruptShard, tar_members

    write_shards(id_source([4]), str(tmp_path), samples_per_shard=4, progress=False)
    data = next((tmp_path / "shards").glob("*.tar")).read_bytes()
    checked, unchecked = tar_members(data, "s"), tar_members(data, "s", check_headers=False)
    assert [(m["fname"], bytes(m["data"])) for m in checked] == \
        [(m["fname"], bytes(m["data"])) for m in unchecked]
    bad = bytearray(data)
    bad[10] ^= 0x01  # inside the first member's name: its header checksum no longer matches
    with pytest.raises(CorruptShard, match="checksum"):
        tar_members(bytes(bad), "s")
