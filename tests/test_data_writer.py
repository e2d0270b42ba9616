"""Sources, shard writer + manifest, storage helpers, and the `arflow data` CLI (local and S3)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arflow_scale.cli import main
from arflow_scale.data import read_manifest, write_shards
from arflow_scale.data.manifest import split_manifest_url
from arflow_scale.data.verify import verify_shards
from arflow_scale.data.sources import (ArraySource, ImageFolderSource, center_crop, digits_source,
                                       fashion_mnist_source, load_source, npz_source)
from arflow_scale.data.storage import filesystem, list_files, read_bytes, with_retries, write_bytes


# ----- sources -----
def test_center_crop_keeps_the_middle():
    """A 30x10 image red | green | blue: the ADM crop to 8 is all green, the box pass halves first."""
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, :10, 0], arr[:, 10:20, 1], arr[:, 20:, 2] = 255, 255, 255
    out = center_crop(Image.fromarray(arr), 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert (out[2:6, 2:6, 1] > 200).all() and (out[2:6, 2:6, [0, 2]] < 50).all()
    gray = center_crop(Image.fromarray(np.full((40, 40), 7, np.uint8)), 5)
    assert gray.shape == (5, 5, 1) and (gray == 7).all()


def test_digits_source():
    src = digits_source()
    assert len(src) == 1797 and src.class_names == [str(d) for d in range(10)]
    img = src.image(0)
    assert img.shape == (8, 8, 1) and img.dtype == np.uint8 and img.max() > 200
    assert digits_source(image_size=16).image(0).shape == (16, 16, 1)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 9, 9, 3]))
    src = fashion_mnist_source(str(tmp_path))
    assert len(src) == 6 and src.class_names[9] == "Ankle boot"
    assert np.array_equal(src.image(4)[..., 0], images[4]) and src.labels.tolist() == [0, 1, 2, 9, 9, 3]
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist_source(str(tmp_path / "nowhere"))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09\x01"))
    with pytest.raises(ValueError, match="truncated IDX"):
        fashion_mnist_source(str(tmp_path))


def test_fashion_mnist_test_split_is_its_own_source_and_recorded(tmp_path):
    rng = np.random.default_rng(1)
    for prefix, count in (("train", 30), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    test = load_source("fashion-mnist", path=str(tmp_path), image_size=32, split="test")
    assert len(test) == 20 and test.image(0).shape == (32, 32, 1) and test.name == "fashion-mnist:test"
    assert len(load_source("fashion-mnist", path=str(tmp_path))) == 30  # train by default
    manifest = write_shards("fashion-mnist", str(tmp_path / "shards"), path=str(tmp_path), image_size=32,
                            split="test", progress=False)
    assert manifest["source"]["split"] == "test" and sum(s["count"] for s in manifest["shards"]) == 20
    with pytest.raises(ValueError, match="split must be one of train, test, got 'val'"):
        load_source("fashion-mnist", path=str(tmp_path), split="val")
    with pytest.raises(ValueError, match="digits: has no 'test' split"):
        load_source("digits", split="test")


def test_npz_and_imagefolder_sources(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 6, 6, 3), np.uint8), labels=np.array([0, 1, 1, 2]))
    src = npz_source(str(tmp_path / "d.npz"), image_size=4)
    assert src.class_names == ["0", "1", "2"] and src.image(0).shape == (4, 4, 3)
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((1, 2, 2, 1), np.uint8), labels=np.zeros(1))
    with pytest.raises(ValueError, match="no array 'images'"):
        npz_source(str(tmp_path / "bad.npz"))
    for cls, size in (("n02", (20, 12)), ("n01", (9, 15))):
        (tmp_path / "root" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", size, (i * 100, 50, 0)).save(tmp_path / "root" / cls / f"{i}.JPEG")
    folder = ImageFolderSource(tmp_path / "root", image_size=8)
    assert folder.class_names == ["n01", "n02"] and folder.labels.tolist() == [0, 0, 1, 1]
    assert folder.image(3).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="unknown source"):
        load_source("cifar")
    with pytest.raises(ValueError, match="image-size"):
        load_source("imagefolder", path=str(tmp_path / "root"))
    with pytest.raises(ValueError, match="labels must lie"):
        ArraySource(np.zeros((2, 2, 2, 1), np.uint8), np.array([0, 5]), ["a", "b"])


# ----- writer + manifest -----
def test_write_shards_one_class_per_shard(tmp_path):
    url = str(tmp_path / "digits")
    manifest = write_shards("digits", url, samples_per_shard=100, workers=2, progress=False)
    assert manifest["format_version"] == 1 and manifest["sample_shape"] == [1, 8, 8]
    assert manifest["dtype"] == "uint8" and manifest["class_names"][3] == "3"
    assert sum(s["count"] for s in manifest["shards"]) == 1797
    assert json.loads((tmp_path / "digits" / "manifest.json").read_text()) == manifest
    for shard in manifest["shards"]:
        raw = (tmp_path / "digits" / shard["path"]).read_bytes()
        assert len(raw) == shard["bytes"] and hashlib.sha256(raw).hexdigest() == shard["sha256"]
        assert shard["crc32"] == zlib.crc32(raw)
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            names = tar.getnames()
            classes = {tar.extractfile(n).read().decode() for n in names if n.endswith(".cls")}
        assert classes == {str(shard["cls"])}
        assert sum(n.endswith(".png") for n in names) == shard["count"] <= 100
    read = read_manifest(url)
    assert read.num_classes == 10 and read.sample_shape == (1, 8, 8) and read.num_samples == 1797
    assert read.class_counts()[0] == 178 and verify_shards(read) == []


def test_write_refuses_non_empty_unless_overwrite(tmp_path):
    url = str(tmp_path / "out")
    write_shards("digits", url, samples_per_shard=64, progress=False)
    assert (tmp_path / "out" / "shards" / "c0000-00002.tar").exists()
    with pytest.raises(ValueError, match="not empty.*overwrite"):
        write_shards("digits", url, progress=False)
    manifest = write_shards("digits", url, samples_per_shard=1000, overwrite=True, progress=False)
    assert len(manifest["shards"]) == 10
    assert not (tmp_path / "out" / "shards" / "c0000-00002.tar").exists()  # stale shards removed


def test_failed_write_leaves_no_manifest(tmp_path):
    class Broken(ArraySource):
        def image(self, index):
            if index == 7:
                raise OSError("disk on fire")
            return super().image(index)

    src = Broken(np.zeros((10, 4, 4, 1), np.uint8), np.zeros(10), ["a"])
    with pytest.raises(OSError, match="disk on fire"):
        write_shards(src, str(tmp_path / "out"), samples_per_shard=3, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_manifest_url_forms():
    assert split_manifest_url("s3://b/p/") == ("s3://b/p", "s3://b/p/manifest.json")
    assert split_manifest_url("s3://b/p/manifest.json") == ("s3://b/p", "s3://b/p/manifest.json")


# ----- storage -----
def test_storage_helpers_local_and_s3(tmp_path, s3_endpoint, make_bucket):
    bucket = make_bucket()
    for base in (str(tmp_path / "store"), f"file://{tmp_path}/store2", f"s3://{bucket}/pre"):
        write_bytes(f"{base}/a/b.bin", b"hello")
        assert read_bytes(f"{base}/a/b.bin") == b"hello"
        assert list_files(base) == {"a/b.bin": 5}
        with pytest.raises(FileNotFoundError, match="c.bin: not found"):
            read_bytes(f"{base}/a/c.bin")
    assert list_files(str(tmp_path / "absent")) == {}
    fs, path = filesystem(f"s3://{bucket}/pre/a/b.bin")
    assert path == f"{bucket}/pre/a/b.bin" and fs.cat_file(path) == b"hello"
    # The endpoint can come from a storage option instead of AWS_ENDPOINT_URL.
    saved = os.environ.pop("AWS_ENDPOINT_URL")
    try:
        assert read_bytes(f"s3://{bucket}/pre/a/b.bin", {"endpoint_url": s3_endpoint}) == b"hello"
    finally:
        os.environ["AWS_ENDPOINT_URL"] = saved
    with pytest.raises(ValueError, match="pipe: URLs are not allowed"):
        filesystem("pipe:curl http://x")


def test_with_retries_backoff_and_permanent_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("blip")
        return "ok"

    assert with_retries(flaky, "mem://x", retries=3, backoff=0.001) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(lambda: calls.append(1) or (_ for _ in ()).throw(FileNotFoundError("gone")), "mem://y",
                     retries=3, backoff=0.001)
    assert len(calls) == 1  # never retried


# ----- CLI -----
def run_cli(capsys, *argv) -> tuple[int, dict]:
    code = main(list(argv))
    out = capsys.readouterr().out.strip().splitlines()
    return code, (json.loads(out[-1]) if out else {})


@pytest.mark.parametrize("store", ["local", "s3"])
def test_cli_shards_and_inspect_verify(store, tmp_path, capsys, request):
    if store == "s3":
        request.getfixturevalue("s3_endpoint")
        url = f"s3://{request.getfixturevalue('make_bucket')()}/digits"
    else:
        url = str(tmp_path / "digits")
    code, result = run_cli(capsys, "data", "shards", "--source", "digits", "--out", url,
                           "--samples-per-shard", "100", "--workers", "2", "--image-size", "8")
    assert code == 0 and result["shards"] == 20 and result["samples"] == 1797 and result["classes"] == 10
    code, info = run_cli(capsys, "data", "inspect", url, "--verify")
    assert code == 0 and info["ok"] and info["verified"] == 20 and info["num_samples"] == 1797
    assert info["classes"][0] == {"id": 0, "name": "0", "shards": 2, "samples": 178,
                                  "bytes": info["classes"][0]["bytes"]} and info["bytes"] == result["bytes"]
    assert main(["data", "shards", "--source", "digits", "--out", url]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    # Damage one shard: --verify reports it and exits 1.
    fs, path = filesystem(url)
    shard = f"{path}/shards/c0003-00001.tar"
    raw = fs.cat_file(shard)
    fs.pipe_file(shard, raw[:600] + bytes([raw[600] ^ 0xFF]) + raw[601:])
    code, info = run_cli(capsys, "data", "inspect", url + "/manifest.json", "--verify")
    assert code == 1 and info["problems"] == [{"shard": "shards/c0003-00001.tar",
                                               "problem": "crc32 and sha256 mismatch"}]


def test_cli_errors(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["data", "shards", "--source", "npz", "--out", str(tmp_path / "o"), "--path", "missing.npz"]) == 2
    assert "npz: file not found" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path), "--storage-option", "novalue"]) == 2
    assert "expected key=value" in capsys.readouterr().err


# ----- benchmark -----
def test_bench_data_given_manifest_and_builtin(tmp_path, capsys):
    url = str(tmp_path / "digits")
    write_shards("digits", url, samples_per_shard=500, progress=False)
    code, result = run_cli(capsys, "bench", "data", "--manifest", url, "--seconds", "0.2", "--batch-size", "8")
    (given,) = result["results"]
    assert code == 0 and given["stream_sequences_per_s"] > 0 and given["raw_MBps"] > 0
    assert given["ratio"] == pytest.approx(given["stream_MBps"] / given["raw_MBps"], rel=0.01, abs=1e-3)
    bound = min(given["raw_MBps"], given["ceiling_MBps"])
    assert given["ceiling_MBps"] > 0 and given["ratio_to_bound"] == pytest.approx(given["stream_MBps"] / bound, rel=0.01)
    code, result = run_cli(capsys, "bench", "data", "--seconds", "0.1", "--batch-size", "8")
    assert code == 0 and [r["store"] for r in result["results"]] == ["local", "s3"]
    assert result["results"][1]["url"].startswith("s3://") and all(r["ratio"] > 0 for r in result["results"])


def test_decode_ceiling_does_the_streams_checks(tmp_path):
    """The codec ceiling verifies and decodes what it holds, as the stream does: a shard changed after
    its manifest was written fails it."""
    from arflow_scale.bench.data import DecodeCeiling
    from arflow_scale.data.decode import CorruptShard

    url = str(tmp_path / "digits")
    manifest = write_shards("digits", url, samples_per_shard=500, progress=False)
    ceiling = DecodeCeiling(url, {}, threads=2)
    ceiling.run_for(0.1)
    assert ceiling.bytes >= manifest["shards"][0]["bytes"] and ceiling.mbps > 0
    shard = tmp_path / "digits" / manifest["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first sample's PNG: same size, other checksums
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShard, match="does not match the manifest"):
        DecodeCeiling(url, {}, threads=1).run_for(0.1)


def test_min_shards_per_class_splits_small_classes_evenly(tmp_path):
    """Classes too small for `min_shards_per_class` shards of `samples_per_shard` are split into that
    many nearly equal shards (every sample once); then no loader worker shares a shard."""
    from arflow_scale.data import SequenceStream

    url = str(tmp_path / "digits")
    manifest = write_shards("digits", url, samples_per_shard=100, min_shards_per_class=4, progress=False)
    counts = {}
    for shard in manifest["shards"]:
        counts.setdefault(shard["cls"], []).append(shard["count"])
    sizes = np.bincount(load_source("digits").labels)
    for cls, shard_counts in counts.items():
        assert len(shard_counts) == 4 and sum(shard_counts) == sizes[cls]  # 174..183 -> 4 shards, not 2
        assert max(shard_counts) - min(shard_counts) <= 1
    assert manifest["source"]["min_shards_per_class"] == 4
    assert SequenceStream.open(url, k=2, batch_size=2, rank=1, world_size=2, num_workers=2).read_amplification() == 1.0
    big = write_shards("digits", str(tmp_path / "big"), samples_per_shard=50, min_shards_per_class=2, progress=False)
    assert sorted({s["count"] for s in big["shards"]})[-1] == 50  # enough shards already: sizes as asked
    with pytest.raises(ValueError, match="min_shards_per_class must be >= 1"):
        write_shards("digits", str(tmp_path / "bad"), min_shards_per_class=0, progress=False)


def test_local_url_forms(tmp_path):
    from arflow_scale.data.storage import is_local_url, local_path

    assert is_local_url("runs/x") and is_local_url(f"file://{tmp_path}") and not is_local_url("s3://b/x")
    assert local_path(f"file://{tmp_path}/a") == tmp_path / "a"
    assert local_path("relative/dir") == (Path.cwd() / "relative" / "dir").resolve()


def test_cold_local_reads_and_raw_reader_processes(tmp_path):
    """The bench's page-cache-dropping filesystem reads the same bytes (a SequenceStream runs on it),
    and raw readers in spawned processes read whole shards or name what failed."""
    from arflow_scale.bench.raw_read import COLD_PROTOCOL, RawReader
    from arflow_scale.data import SequenceStream
    from arflow_scale.data.storage import filesystem

    url = str(tmp_path / "digits")
    manifest = write_shards("digits", url, samples_per_shard=200, progress=False)
    shard = f"{url}/{manifest['shards'][0]['path']}"
    cold_fs, cold_path = filesystem(f"{COLD_PROTOCOL}://{shard}")
    assert cold_fs.cat_file(cold_path) == Path(shard).read_bytes()
    batches = []
    for stream_url in (f"{COLD_PROTOCOL}://{url}", url):
        it = iter(SequenceStream.open(stream_url, k=2, batch_size=4, seed=1))
        batches.append([next(it) for _ in range(3)])
        it.close()
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(*batches))
    raw = RawReader(url, {}, processes=2, threads=1)
    try:
        raw.run_for(0.3)
    finally:
        raw.close()
    sizes = {s["bytes"] for s in manifest["shards"]}
    assert raw.bytes >= min(sizes) and raw.readers == 2
    with pytest.raises(RuntimeError, match="raw reader process: FileNotFoundError"):
        RawReader(str(tmp_path / "nowhere"), {}, processes=1)
    with open(shard, "ab") as f:  # a shard no longer the size the manifest says: a reader thread's error
        f.write(b"x")
    threaded = RawReader(url, {}, threads=2)
    with pytest.raises(RuntimeError, match="manifest says"):
        threaded.run_for(0.5)
