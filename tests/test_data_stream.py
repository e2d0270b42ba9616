"""SequenceStream: same-class K distinct samples, flips, class choice, disjoint split, resume, S3."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from arflow_scale.data import SequenceStream, write_shards
from arflow_scale.data.prefetch import fetch_threads
from arflow_scale.data.sources import ArraySource

NUM_CLASSES = 5


def id_source(counts: list[int]) -> ArraySource:
    """4x4 images that carry their own id: row 0 = [255, 0, 0, 0] (flip marker), row 1 = id."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    images = np.zeros((len(labels), 4, 4, 1), np.uint8)
    images[:, 0, 0] = 255
    images[:, 1, :, 0] = np.arange(len(labels))[:, None]
    return ArraySource(images, labels, [f"c{c}" for c in range(len(counts))], name="ids")


def decode(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(B, K, 1, 4, 4) in [-1, 1] -> ids (B, K), flipped (B, K)."""
    pixels = np.round((images.numpy() + 1) * 127.5).astype(int)
    return pixels[:, :, 0, 1, 0], pixels[:, :, 0, 0, 3] == 255


@pytest.fixture(scope="module")
def id_data(tmp_path_factory):
    """Id dataset, 40 samples per class, 8 shards per class (shard split for <= 8 consumers)."""
    counts = [40] * NUM_CLASSES
    url = str(tmp_path_factory.mktemp("ids") / "shards")
    write_shards(id_source(counts), url, samples_per_shard=5, progress=False)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return url, labels


@pytest.fixture(scope="module")
def id_data_one_shard(tmp_path_factory):
    """Same ids, ONE shard per class: forces the per-sample split across consumers."""
    url = str(tmp_path_factory.mktemp("ids1") / "shards")
    write_shards(id_source([40] * NUM_CLASSES), url, samples_per_shard=1000, progress=False)
    return url


def take(stream: SequenceStream, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_sequences_same_class_distinct_and_in_range(id_data):
    url, labels = id_data
    stream = SequenceStream.open(url, k=4, batch_size=6, seed=3)
    assert stream.manifest.num_classes == NUM_CLASSES and stream.manifest.sample_shape == (1, 4, 4)
    for images, y in take(stream, 20):
        assert images.shape == (6, 4, 1, 4, 4) and images.dtype == torch.float32 and y.dtype == torch.long
        assert images.min() >= -1 and images.max() <= 1
        ids, _ = decode(images)
        for seq_ids, label in zip(ids, y.tolist()):
            assert len(set(seq_ids.tolist())) == 4, "K samples must be distinct"
            assert (labels[seq_ids] == label).all(), "every image of a sequence has the sequence's class"


def test_flip_per_image_and_off(id_data):
    url, _ = id_data
    flips = np.concatenate([decode(x)[1].ravel() for x, _ in take(SequenceStream.open(url, k=3, batch_size=8), 10)])
    assert 0.3 < flips.mean() < 0.7
    no_flip = np.concatenate([decode(x)[1].ravel() for x, _ in take(SequenceStream.open(url, k=3, batch_size=8, flip=False), 5)])
    assert not no_flip.any()


def test_class_sampling_uniform_vs_proportional(tmp_path):
    url = str(tmp_path / "imbalanced")
    write_shards(id_source([160, 20]), url, samples_per_shard=40, progress=False)
    fractions = {}
    for mode in ("uniform", "proportional"):
        ys = torch.cat([y for _, y in take(SequenceStream.open(url, k=2, batch_size=50, class_sampling=mode), 8)])
        fractions[mode] = (ys == 0).float().mean().item()
    assert 0.4 < fractions["uniform"] < 0.6
    assert fractions["proportional"] > 0.8  # 160 / 180 = 0.89


def test_epochs_cover_every_sample_and_count(id_data):
    url, labels = id_data
    stream = SequenceStream.open(url, k=4, batch_size=10, shuffle_buffer=16, class_sampling="proportional")
    seen = np.zeros(len(labels), int)
    for images, _ in take(stream, 25):  # 1000 samples drawn from 200 -> about 5 passes
        np.add.at(seen, decode(images)[0].ravel(), 1)
    assert (seen > 0).all()
    assert stream.epoch >= 2 and stream.batches == 25


def test_deterministic_given_seed(id_data):
    url, _ = id_data
    a = take(SequenceStream.open(url, k=3, batch_size=4, seed=5), 6)
    b = take(SequenceStream.open(url, k=3, batch_size=4, seed=5), 6)
    c = take(SequenceStream.open(url, k=3, batch_size=4, seed=6), 6)
    assert same(a, b) and not same(a, c)


@pytest.mark.filterwarnings("ignore:.*fewer shards than:RuntimeWarning")  # shared shards on purpose
@pytest.mark.parametrize("layout", ["8 shards/class", "1 shard/class", "3 shards/class"])
def test_consumers_disjoint_and_see_every_class(layout, request, tmp_path):
    """4 consumers (4 ranks x 1 worker): disjoint samples, each covers every class, whether shards
    are split whole (8 >= 4), by sample (1 shard), or mixed (3 shards: one shared by 2 consumers)."""
    if layout == "8 shards/class":
        url = request.getfixturevalue("id_data")[0]
    elif layout == "1 shard/class":
        url = request.getfixturevalue("id_data_one_shard")
    else:
        url = str(tmp_path / "three")
        write_shards(id_source([40] * NUM_CLASSES), url, samples_per_shard=14, progress=False)
    per_rank = []
    for rank in range(4):
        ids, ys = set(), set()
        for images, y in take(SequenceStream.open(url, k=2, batch_size=10, rank=rank, world_size=4, seed=1), 12):
            ids |= set(decode(images)[0].ravel().tolist())
            ys |= set(y.tolist())
        assert ys == set(range(NUM_CLASSES))
        per_rank.append(ids)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not per_rank[i] & per_rank[j], f"ranks {i} and {j} share samples"
    assert len(set().union(*per_rank)) == 200  # 320 draws per rank from its ~50: all covered


@pytest.mark.filterwarnings("ignore:.*fewer shards than:RuntimeWarning")  # shared shards on purpose
def test_two_ranks_two_workers_disjoint(id_data_one_shard):
    """world 2 x 2 DataLoader workers: batch n comes from worker n % 2; all 4 consumers disjoint."""
    consumers = {}
    for rank in range(2):
        for n, (images, _) in enumerate(take(SequenceStream.open(id_data_one_shard, k=2, batch_size=10, rank=rank,
                                                            world_size=2, num_workers=2), 24)):
            consumers.setdefault((rank, n % 2), set()).update(decode(images)[0].ravel().tolist())
    sets = list(consumers.values())
    assert len(sets) == 4 and all(len(s) == 50 for s in sets)
    assert len(set().union(*sets)) == 200


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_exact(id_data, num_workers):
    url, _ = id_data
    kwargs = dict(k=3, batch_size=4, seed=11, rank=1, world_size=2, num_workers=num_workers, shuffle_buffer=8)
    full = take(SequenceStream.open(url, **kwargs), 14)
    stream = SequenceStream.open(url, **kwargs)
    it = iter(stream)
    head = [next(it) for _ in range(5)]
    state = stream.state_dict()
    assert same(head, full[:5])
    # The state survives JSON and torch.save(weights_only=True) round trips.
    state = json.loads(json.dumps(state))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = SequenceStream.open(url, **kwargs)
    resumed.load_state_dict(state)
    assert resumed.batches == 5
    assert same(take(resumed, 9), full[5:])
    # Iterating the original again also continues where it stopped.
    assert same(take(stream, 3), full[5:8])


def test_load_state_rejects_other_settings(id_data):
    url, _ = id_data
    state = SequenceStream.open(url, k=3, batch_size=4, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        SequenceStream.open(url, k=3, batch_size=4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        SequenceStream.open(url, k=3, batch_size=4, seed=1).load_state_dict({"version": 99})


def test_bad_arguments(id_data):
    url, _ = id_data
    with pytest.raises(ValueError, match="rank"):
        SequenceStream.open(url, k=2, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="class_sampling"):
        SequenceStream.open(url, k=2, batch_size=2, class_sampling="zipf")
    with pytest.raises(ValueError, match="batch_size"):
        SequenceStream.open(url, k=2, batch_size=0)


def test_class_too_small_for_k_left_out(tmp_path):
    url = str(tmp_path / "small")
    write_shards(id_source([30, 2]), url, samples_per_shard=100, progress=False)
    with pytest.warns(RuntimeWarning, match="fewer than K=3"):
        batches = take(SequenceStream.open(url, k=3, batch_size=8), 3)
    assert all((y == 0).all() for _, y in batches)


def test_from_config(id_data):
    from arflow_scale.config import DataConfig

    url, _ = id_data
    cfg = DataConfig(manifest=url, batch_size=3, flip=False, shuffle_buffer=8)
    images, y = next(iter(SequenceStream.from_config(cfg, k=2, seed=0, rank=0, world_size=1)))
    assert images.shape == (3, 2, 1, 4, 4) and not decode(images)[1].any()
    with pytest.raises(ValueError, match="data.manifest"):
        SequenceStream.from_config(DataConfig(), k=2, seed=0, rank=0, world_size=1)


def test_latents_from_encoder(tmp_path):
    """An encoder's latents are stored as .npy and come back as the stored tensor."""
    url = str(tmp_path / "latents")

    def encoder(images: np.ndarray, indices: np.ndarray) -> np.ndarray:  # uint8 (N, 4, 4, 1) -> float32 (N, 2, 2, 2)
        x = images[..., 0].astype(np.float32)
        return np.stack([x[:, 1::2, ::2], x[:, ::2, 1::2] / 255.0], axis=1)

    manifest = write_shards(id_source([12, 12]), url, samples_per_shard=6, encoder=encoder, progress=False)
    assert manifest["sample_ext"] == "npy" and manifest["sample_shape"] == [2, 2, 2] and manifest["dtype"] == "float32"
    images, y = next(iter(SequenceStream.open(url, k=3, batch_size=4, flip=False)))
    assert images.shape == (4, 3, 2, 2, 2) and images.dtype == torch.float32
    ids = images[:, :, 0, 0, 0].numpy().astype(int)  # image row 1 (= id) survives the encoder
    assert all(len(set(s)) == 3 and all(i // 12 == label for i in s) for s, label in zip(ids, y.tolist()))


def test_s3_write_and_stream(s3_endpoint, make_bucket):
    bucket = make_bucket()
    url = f"s3://{bucket}/ids"
    write_shards(id_source([24] * 3), url, samples_per_shard=6, progress=False, workers=3)
    kwargs = dict(k=3, batch_size=4, seed=2, num_workers=2)
    stream = SequenceStream.open(url, **kwargs)
    it = iter(stream)
    head = [next(it) for _ in range(2)]
    state = stream.state_dict()
    tail = [next(it) for _ in range(4)]
    for images, y in head + tail:
        ids, _ = decode(images)
        assert all((s // 24 == label).all() and len(set(s)) == 3 for s, label in zip(ids, y.tolist()))
    resumed = SequenceStream.open(url + "/manifest.json", **kwargs)  # the manifest URL works too
    resumed.load_state_dict(state)
    assert same(take(resumed, 4), tail)


def prefetch_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "arflow-shard-prefetch" and t.is_alive()]


def test_prefetch_same_batches_and_thread_ends(id_data):
    """Background prefetch changes nothing in the batches or the resume state, and its thread
    ends when the iterator is closed or garbage collected."""
    import gc

    url, _ = id_data
    kwargs = dict(k=3, batch_size=6, seed=4, shuffle_buffer=8)
    direct = SequenceStream.open(url, prefetch=0, **kwargs)
    expected = take(direct, 30)  # 540 draws from 200 samples: several epochs, many unit switches
    assert not prefetch_threads()
    stream = SequenceStream.open(url, prefetch=3, **kwargs)
    it = iter(stream)
    got = [next(it) for _ in range(12)]
    assert len(prefetch_threads()) == fetch_threads(3)
    state = stream.state_dict()
    it.close()
    assert not prefetch_threads()
    resumed = SequenceStream.open(url, prefetch=3, **kwargs)
    resumed.load_state_dict(state)
    got += take(resumed, 18)  # the iterator inside take() is dropped on return
    gc.collect()
    assert not prefetch_threads()
    assert same(got, expected) and state == direct_state_after(url, kwargs, 12)
    with pytest.raises(ValueError, match="prefetch"):
        SequenceStream.open(url, prefetch=-1, **kwargs)


def direct_state_after(url: str, kwargs: dict, n: int) -> dict:
    stream = SequenceStream.open(url, prefetch=0, **kwargs)
    take(stream, n)
    return stream.state_dict()


def test_assemble_batch_equals_stack_flip_scale():
    """One copy per sample (mirrored on the way) equals stacking, flipping and scaling afterwards."""
    from arflow_scale.data.consumer import assemble_batch

    rng = np.random.default_rng(0)
    flips = rng.random((3, 4)) < 0.5
    images = [[rng.integers(0, 256, (5, 6, 3), dtype=np.uint8) for _ in range(4)] for _ in range(3)]
    stacked = np.stack([np.stack(seq) for seq in images])  # (B, K, H, W, C)
    mirrored = np.where(flips[:, :, None, None, None], stacked[:, :, :, ::-1], stacked)
    expected = mirrored.transpose(0, 1, 4, 2, 3).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    got = assemble_batch(images, flips, pixels=True)
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    latents = [[rng.normal(size=(4, 2, 5)).astype(np.float32) for _ in range(4)] for _ in range(3)]
    stacked = np.stack([np.stack(seq) for seq in latents])
    assert np.array_equal(assemble_batch(latents, flips, pixels=False),
                          np.where(flips[:, :, None, None, None], stacked[..., ::-1], stacked))
    assert np.array_equal(assemble_batch(latents, None, pixels=False), stacked)


def test_read_amplification_warns_when_consumers_share_shards(id_data, id_data_one_shard, tmp_path):
    """With fewer shards per class than consumers each consumer fetches whole shards to keep a share of
    them: the stream says by how much and what to write instead."""
    import warnings

    with pytest.warns(RuntimeWarning, match=r"4\.0x the bytes it uses; write the shards with --min-shards-per-class 4"):
        shared = SequenceStream.open(id_data_one_shard, k=2, batch_size=2, rank=1, world_size=2, num_workers=2)
    assert shared.read_amplification() == 4.0
    url = str(tmp_path / "three")  # 14 + 14 + 12 per class for 4 consumers: shard 0 shared by 2
    write_shards(id_source([40] * NUM_CLASSES), url, samples_per_shard=14, progress=False)
    mixed = [SequenceStream.open(url, k=2, batch_size=2, rank=r, world_size=4) for r in range(4)]
    assert [m.read_amplification() for m in mixed] == [2.0, 1.0, 1.0, 2.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        whole = SequenceStream.open(id_data[0], k=2, batch_size=2, rank=1, world_size=2, num_workers=2)
    assert whole.read_amplification() == 1.0


def test_memory_estimate_counts_units_buffers_and_prefetch(tmp_path, monkeypatch):
    """Per class: largest unit + min(shuffle buffer, owned samples); plus prefetch units; x decoded bytes."""
    url = str(tmp_path / "ids")
    write_shards(id_source([40] * NUM_CLASSES), url, samples_per_shard=15, progress=False)  # units 15, 15, 10
    stream = SequenceStream.open(url, k=2, batch_size=2, shuffle_buffer=8, prefetch=3)
    sample_bytes = 1 * 4 * 4  # uint8 (1, 4, 4)
    assert stream.memory_estimate() == (NUM_CLASSES * (15 + 8) + 3 * 15) * sample_bytes
    two_ranks = SequenceStream.open(url, k=2, batch_size=2, shuffle_buffer=100, prefetch=0, rank=1, world_size=2)
    assert two_ranks.memory_estimate() == NUM_CLASSES * (15 + 15) * sample_bytes  # rank 1: shard 2 of 3 -> 15
    monkeypatch.setattr("arflow_scale.data.stream.MEMORY_WARN_BYTES", 100)
    with pytest.warns(RuntimeWarning, match="GiB of decoded samples"):
        SequenceStream.open(url, k=2, batch_size=2)
