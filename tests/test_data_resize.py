"""SequenceStream across world sizes: `load_state_dicts` continues the whole run's position, not a rank's.

The id dataset's samples carry their own id, so the tests count exactly which samples a pass read twice.
"""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from arflow_scale.data import SequenceStream, write_shards
from test_data_stream import NUM_CLASSES, decode, id_source, same, take

PER_CLASS = 40


@pytest.fixture(scope="module")
def ids_url(tmp_path_factory):
    """40 samples per class in 8 shards of 5: two ranks get 4 whole shards (20 samples) of each class."""
    url = str(tmp_path_factory.mktemp("resize") / "shards")
    write_shards(id_source([PER_CLASS] * NUM_CLASSES), url, samples_per_shard=5, progress=False)
    return url


def class_draws(batches) -> dict[int, list[int]]:
    """Sample ids drawn per class, in draw order (a sequence's K ids in the order it holds them)."""
    out: dict[int, list[int]] = {c: [] for c in range(NUM_CLASSES)}
    for images, labels in batches:
        for seq_ids, label in zip(decode(images)[0].tolist(), labels.tolist()):
            out[label].extend(seq_ids)
    return out


def run(url, n, states=None, **kwargs):
    """(n batches, state after them) of a stream, resumed from `states` (all ranks of a run) if given."""
    stream = SequenceStream.open(url, **kwargs)
    if states is not None:
        stream.load_state_dicts(states)
    batches = take(stream, n)
    return batches, json.loads(json.dumps(stream.state_dict()))


def class_members(c: int) -> set[int]:
    return set(range(c * PER_CLASS, (c + 1) * PER_CLASS))


def check_resized_pass(consumed: dict[int, set[int]], new: dict[int, list[int]], k: int, capacity: int) -> None:
    """A single new consumer's draws of each class: of its first m (m = samples not consumed before), at most
    `capacity` are not distinct samples of the resized pass (the bound in stream.py); with capacity K the
    draws follow the reads, so the first ceil(m / K) sequences hold every such sample exactly once."""
    for c, drawn in new.items():
        left = class_members(c) - consumed[c]
        m = len(left)
        assert len(drawn) >= math.ceil(m / k) * k, f"class {c}: too few draws to judge"
        if capacity == k:
            head = drawn[: math.ceil(m / k) * k]
            counts = Counter(x for x in head if x in left)
            assert set(counts) == left and set(counts.values()) <= {1}, \
                f"class {c}: a sample of the pass was lost or read twice: {counts}"
        else:
            outside = m - len(left.intersection(drawn[:m]))
            assert outside <= capacity, f"class {c}: {outside} of the first {m} draws outside the pass"


def test_two_ranks_to_one_reads_no_sample_twice_within_the_pass(ids_url):
    """2 ranks -> 1 rank with shuffle_buffer <= K (draws in read order): per class, the samples the ranks
    had drawn in their current pass plus the new rank's resized pass are every sample exactly once; some
    classes had crossed into a second pass on the old ranks."""
    kwargs = dict(k=2, batch_size=4, seed=7, shuffle_buffer=2)
    old = [run(ids_url, 12, rank=r, world_size=2, **kwargs) for r in range(2)]
    share = PER_CLASS // 2
    consumed = {c: set() for c in range(NUM_CLASSES)}
    crossed = 0
    for batches, _ in old:
        for c, drawn in class_draws(batches).items():
            consumed[c] |= set(drawn[share * (len(drawn) // share):])  # the draws of the current pass
            crossed += len(drawn) >= share
    assert crossed, "no class crossed into a second pass: the test would not cover it"
    new, _ = run(ids_url, 90, states=[state for _, state in old], **kwargs)
    check_resized_pass(consumed, class_draws(new), k=2, capacity=2)


def test_resize_chain_carries_what_was_consumed(ids_url):
    """1 rank -> 2 ranks -> 1 rank within one pass: the last resized pass skips what the first rank and
    then both ranks had consumed (the skip sets travel through the middle run's states)."""
    kwargs = dict(k=2, batch_size=4, seed=3, shuffle_buffer=2)
    first, first_state = run(ids_url, 3, **kwargs)
    middle = [run(ids_url, 2, states=[first_state], rank=r, world_size=2, **kwargs) for r in range(2)]
    consumed = {c: set(ids) for c, ids in class_draws(first).items()}
    for batches, _ in middle:
        for c, ids in class_draws(batches).items():
            assert not consumed[c] & set(ids), f"class {c}: the middle run drew a sample consumed before"
            consumed[c] |= set(ids)
    last, _ = run(ids_url, 90, states=[state for _, state in middle], **kwargs)
    check_resized_pass(consumed, class_draws(last), k=2, capacity=2)


def test_resize_with_a_shuffle_buffer_stays_within_the_bound(ids_url):
    """2 ranks x 2 loader workers -> 1 rank, shuffle buffer 4: samples buffered but never drawn are read
    again, and of the first m draws of a class at most C = 4 come from the next pass."""
    kwargs = dict(k=2, batch_size=2, seed=5, shuffle_buffer=4)
    old = [run(ids_url, 4, rank=r, world_size=2, num_workers=2, **kwargs) for r in range(2)]
    consumed = {c: set() for c in range(NUM_CLASSES)}
    for batches, _ in old:
        for worker in range(2):  # batch n comes from loader worker n % 2, whose share is 10 per class
            for c, ids in class_draws(batches[worker::2]).items():
                assert len(ids) + 4 <= PER_CLASS // 4, "a consumer left its first pass: the test needs fewer draws"
                consumed[c] |= set(ids)
    new, _ = run(ids_url, 90, states=[state for _, state in old], **kwargs)
    check_resized_pass(consumed, class_draws(new), k=2, capacity=4)
    fresh = class_draws(take(SequenceStream.open(ids_url, **kwargs), 90))
    left = {c: class_members(c) - consumed[c] for c in fresh}
    outside = [len(left[c]) - len(left[c].intersection(ids[:len(left[c])])) for c, ids in fresh.items()]
    assert max(outside) > 4, "a stream that ignored the old states would stay within the bound: a weak test"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_world_size_is_exactly_the_rank_continuation(ids_url, num_workers):
    kwargs = dict(k=3, batch_size=4, seed=11, world_size=2, num_workers=num_workers, shuffle_buffer=8)
    states = [run(ids_url, 5, rank=r, **kwargs)[1] for r in range(2)]
    for rank in range(2):
        own = SequenceStream.open(ids_url, rank=rank, **kwargs)
        own.load_state_dict(states[rank])
        all_ranks = SequenceStream.open(ids_url, rank=rank, **kwargs)
        all_ranks.load_state_dicts(list(reversed(states)))
        assert all_ranks.state_dict() == own.state_dict()
        assert same(take(all_ranks, 6), take(own, 6))


def test_resized_stream_is_reproducible_and_validated(ids_url):
    kwargs = dict(k=2, batch_size=4, seed=7, shuffle_buffer=4)
    states = [run(ids_url, 3, rank=r, world_size=2, **kwargs)[1] for r in range(2)]
    a, state_a = run(ids_url, 5, states=states, num_workers=2, **kwargs)
    b, state_b = run(ids_url, 5, states=states, num_workers=2, **kwargs)
    assert same(a, b) and state_a == state_b
    resumed, _ = run(ids_url, 3, states=[state_a], num_workers=2, **kwargs)  # same layout: exact
    assert same(resumed, run(ids_url, 8, states=states, num_workers=2, **kwargs)[0][5:])
    with pytest.raises(ValueError, match=r"all ranks 0\.\.1 .* got ranks \[0\]"):
        SequenceStream.open(ids_url, **kwargs).load_state_dicts(states[:1])
    with pytest.raises(ValueError, match="seed = 7 but this stream has 8"):
        SequenceStream.open(ids_url, **{**kwargs, "seed": 8}).load_state_dicts(states)
