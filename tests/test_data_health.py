"""The data problems of all ranks reach rank 0's metrics: two real gloo ranks, each with its own stream over
shards of which some are corrupt (rank 0 sees one, rank 1 four, which drop a class for it)."""
from __future__ import annotations

import multiprocessing
import warnings

from arflow_scale.data import SequenceStream, write_shards
from arflow_scale.train.data_health import DataHealth, DataHealthWatch, gather_data_health
from test_data_faults import damage
from test_data_stream import id_source, take


def _rank(rank: int, url: str, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    stream = SequenceStream.open(url, k=2, batch_size=8, shuffle_buffer=4, rank=rank, world_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        take(stream, 20)
    results.put((rank, stream.skipped_shards, gather_data_health(stream)))
    dist.destroy_process_group()


def test_rank_zero_sees_every_rank_s_corrupt_shards_and_dropped_classes(tmp_path):
    url = tmp_path / "shards"
    write_shards(id_source([40] * 5), str(url), samples_per_shard=5, progress=False)  # 8 shards per class
    damage(url / "shards" / "c0000-00000.tar", "checksum")  # rank 0's (shard j goes to rank j % 2)
    for j in (1, 3, 5, 7):  # all of rank 1's shards of class 4
        damage(url / "shards" / f"c0004-{j:05d}.tar", "checksum")
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ranks = [context.Process(target=_rank, args=(r, str(url), str(tmp_path / "init"), results)) for r in range(2)]
    for p in ranks:
        p.start()
    got = {rank: (own, health) for rank, own, health in (results.get(timeout=120) for _ in ranks)}
    for p in ranks:
        p.join(30)
    assert got[0][0] == 1 and got[1][0] == 4  # each stream counts its own
    expected = DataHealth(corrupt_shards=tuple(sorted(got[0][1].corrupt_shards)), dropped=((4, (1,)),))
    assert got[0][1] == got[1][1] == expected and len(expected.corrupt_shards) == 5
    assert expected.metrics() == {"skipped_shards": 5.0, "classes_dropped": 1.0}


def test_watch_reports_changes_only():
    watch = DataHealthWatch()
    assert watch.notice(DataHealth()) is None
    first = DataHealth(corrupt_shards=(3,), dropped=((4, (1, 2)),))
    assert watch.notice(first) == ("data: 1 corrupt shard(s) skipped over all ranks, 1 class(es) dropped "
                                   "(class 4 on ranks 1, 2)")
    assert watch.notice(first) is None
    assert watch.notice(DataHealth(corrupt_shards=(3, 9))) == \
        "data: 2 corrupt shard(s) skipped over all ranks, 0 class(es) dropped"


def test_single_process_needs_no_process_group(tmp_path):
    url = tmp_path / "shards"
    write_shards(id_source([10] * 2), str(url), samples_per_shard=5, progress=False)
    stream = SequenceStream.open(str(url), k=2, batch_size=2)
    take(stream, 2)
    assert gather_data_health(stream) == DataHealth()
