"""The held-out validation loss: a split fixed by the manifest and never trained on, fixed sequences and noise,
the same number for the same weights whatever the world size."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from arflow_scale.config import config_from_dict
from arflow_scale.data import SequenceStream, read_manifest, write_shards
from arflow_scale.data.validation import load_validation_set
from arflow_scale.tasks import task_for
from arflow_scale.train.validation import Validator, sequence_seed

from conftest import free_port, randomized

K, SEQUENCES = 3, 10


@pytest.fixture(scope="module")
def digits_with_val(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("val") / "digits")
    write_shards("digits", url, samples_per_shard=100, val_per_class=8, progress=False)
    return url


def tiny_task():
    cfg = config_from_dict({}, ["model.size=tiny/2", "model.image_size=8", "model.in_channels=1", f"model.k={K}"])
    return task_for(cfg.model)


def test_the_split_is_fixed_and_never_streamed(digits_with_val, tmp_path):
    manifest = read_manifest(digits_with_val)
    val = manifest.shard_indices("val")
    assert len(val) == 10 and all(manifest.shards[i].count == 8 for i in val)
    assert sum(manifest.class_counts("val")) == 80 and sum(manifest.class_counts()) == 1797 - 80
    again = str(tmp_path / "again")
    write_shards("digits", again, samples_per_shard=100, val_per_class=8, progress=False)
    assert [s.sha256 for s in read_manifest(again).shards] == [s.sha256 for s in manifest.shards]
    held = {p for p in (tmp_path / "again" / "shards").iterdir() if p.name.startswith("v")}
    assert len(held) == 10
    stream = SequenceStream.open(digits_with_val, k=2, batch_size=8, seed=0)
    assert stream._spec.shards == tuple(manifest.shard_indices("train"))


def test_validation_set_is_a_function_of_manifest_and_seed(digits_with_val):
    a = load_validation_set(digits_with_val, k=K, sequences=SEQUENCES, seed=3)
    b = load_validation_set(digits_with_val, k=K, sequences=SEQUENCES, seed=3)
    c = load_validation_set(digits_with_val, k=K, sequences=SEQUENCES, seed=4)
    assert a.images.shape == (SEQUENCES, K, 1, 8, 8) and a.images.min() >= -1 and a.images.max() <= 1
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.labels.tolist() == [i % 10 for i in range(SEQUENCES)]
    with pytest.raises(ValueError, match="no class has 9 held-out samples"):
        load_validation_set(digits_with_val, k=9, sequences=2, seed=0)


def test_a_sequence_scores_the_same_whatever_batch_it_is_in(digits_with_val, one_thread):
    task = tiny_task()
    torch.manual_seed(0)
    model = randomized(task.build_model())
    validation = load_validation_set(digits_with_val, k=K, sequences=4, seed=0)
    seeds = [sequence_seed(0, i) for i in range(4)]
    whole = task.validation_losses(model, validation.images, validation.labels, seeds)
    pairs = torch.cat([task.validation_losses(model, validation.images[i:i + 2], validation.labels[i:i + 2],
                                              seeds[i:i + 2]) for i in (0, 2)])
    assert whole.shape == (4,) and torch.allclose(whole, pairs, rtol=1e-6)
    assert len(set(seeds)) == 4


def _evaluate_in_group(rank: int, world: int, port: int, url: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        task = tiny_task()
        torch.manual_seed(0)
        model = randomized(task.build_model())
        validation = load_validation_set(url, k=K, sequences=SEQUENCES, seed=0)
        value = Validator(task, validation, seed=0, batch_size=4, rank=rank, world_size=world,
                          device=torch.device("cpu"), bf16=False).evaluate(model)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(value, f)
    finally:
        dist.destroy_process_group()


def test_the_validation_loss_is_identical_on_one_and_two_ranks(digits_with_val, tmp_path, one_thread):
    """10 sequences in batches of 4 (3 batches): rank 0 of 2 takes batches 0 and 2, rank 1 takes batch 1 and a
    padding round; the gathered mean equals the single-rank one bit for bit."""
    task = tiny_task()
    torch.manual_seed(0)
    model = randomized(task.build_model())
    validation = load_validation_set(digits_with_val, k=K, sequences=SEQUENCES, seed=0)
    single = Validator(task, validation, seed=0, batch_size=4, rank=0, world_size=1, device=torch.device("cpu"),
                       bf16=False).evaluate(model)
    out = str(tmp_path / "two.json")
    mp.spawn(_evaluate_in_group, args=(2, free_port(), digits_with_val, out), nprocs=2, join=True)
    with open(out) as f:
        assert json.load(f) == single and math.isfinite(single) and single > 0
