"""`arflow data inspect --verify` rejects exactly what the stream rejects, also when every checksum matches:
shards rewritten with a sample too few, a wrong class, a wrong shape, an undecodable image."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arflow_scale.cli import main
from arflow_scale.data import SequenceStream, read_manifest, write_shards
from arflow_scale.data.manifest import checksum_mismatch
from arflow_scale.data.verify import verify_shards
from test_data_stream import id_source, take


def png(side: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint8)).save(out, format="PNG")
    return out.getvalue()


def rewrite(path: Path, change) -> None:
    """Rewrite a shard's tar with `change(members) -> members` applied to its (name, bytes) list."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in change(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(out.getvalue())


def replace_first(suffix: str, data: bytes):
    def change(members):
        index = next(i for i, (name, _) in enumerate(members) if name.endswith(suffix))
        return members[:index] + [(members[index][0], data)] + members[index + 1:]
    return change


DEFECTS = {  # shard -> the defect written into it
    "shards/c0000-00001.tar": lambda members: members[2:],  # one sample (.cls + .png) too few
    "shards/c0001-00003.tar": replace_first(".cls", b"3"),  # a sample of another class
    "shards/c0002-00000.tar": replace_first(".png", png(8)),  # 8x8 where the manifest says 4x4
    "shards/c0003-00002.tar": replace_first(".png", b"\x89PNG\r\n\x1a\n not an image"),
}


@pytest.fixture()
def defective(tmp_path) -> str:
    """Id shards with the DEFECTS, whose manifest records the damaged bytes' sizes and checksums."""
    url = tmp_path / "shards"
    write_shards(id_source([40] * 5), str(url), samples_per_shard=5, progress=False)
    manifest = json.loads((url / "manifest.json").read_text())
    for shard in manifest["shards"]:
        if shard["path"] in DEFECTS:
            rewrite(url / shard["path"], DEFECTS[shard["path"]])
            raw = (url / shard["path"]).read_bytes()
            shard.update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest(), crc32=zlib.crc32(raw))
    (url / "manifest.json").write_text(json.dumps(manifest))
    return str(url)


def test_verify_names_every_shard_the_stream_rejects(defective):
    manifest = read_manifest(defective)
    for shard in manifest.shards:  # sizes and checksums alone find nothing
        assert not checksum_mismatch(shard, (Path(defective) / shard.path).read_bytes(), thorough=True)
    problems = {p["shard"]: p["problem"] for p in verify_shards(manifest)}
    assert set(problems) == set(DEFECTS)
    assert "the stream rejects it" in problems["shards/c0000-00001.tar"] and "4 samples, manifest says 5" in \
        problems["shards/c0000-00001.tar"]
    assert "not a png sample of class 1" in problems["shards/c0001-00003.tar"]
    assert "has shape (8, 8, 1), manifest says (1, 4, 4)" in problems["shards/c0002-00000.tar"]
    stream = SequenceStream.open(defective, k=2, batch_size=10, shuffle_buffer=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        take(stream, 30)  # 600 draws over 200 samples: every shard read
    assert {manifest.shards[i].path for i in stream.corrupt_shards} == set(DEFECTS)


def test_inspect_verify_exit_code_and_report(defective, capsys):
    assert main(["data", "inspect", defective, "--verify", "--workers", "2"]) == 1
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ok"] is False and report["verified"] == report["num_shards"] - len(DEFECTS)
    assert sorted(p["shard"] for p in report["problems"]) == sorted(DEFECTS)
    clean = str(Path(defective).parent / "clean")
    write_shards(id_source([10] * 2), clean, samples_per_shard=5, progress=False)
    assert main(["data", "inspect", clean, "--verify"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ok"] is True
