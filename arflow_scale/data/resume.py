"""A stream's state for another world size (or number of loader workers), from the states of all old ranks.

Every old consumer's state says, per class, its pass (epoch), how far it read its units in that pass
(unit position, offset) and which read samples were still in its shuffle buffer. Its units and their order
are recomputed from the old run's (seed, rank, world size, loader workers), so what it had *consumed* in
its current pass is: the samples it had read in the pass, plus those skipped in it (consumed before an
earlier resize), minus the buffered ones (read, never drawn). A consumer that had read its whole share
counts as starting the next pass with nothing consumed.

The new consumers start every class at the lowest old pass, skipping, for that pass only, the union of
what the old consumers had consumed in theirs (`ClassReader.skip`). The bound this gives is in stream.py.
"""
from __future__ import annotations

from collections.abc import Sequence

from .consumer import StreamSpec
from .sample_sets import ClassSampleSets
from .units import plan_units, unit_ids, unit_order, unit_size

STATE_VERSION = 1
SAME_RUN_KEYS = ("seed", "k", "num_shards")  # what a state of any world size must share with the stream


def check_old_states(states: Sequence[dict], spec: StreamSpec, num_shards: int) -> tuple[int, int]:
    """-> (old world size, old loader workers per rank); ValueError naming what does not fit."""
    if not states:
        raise ValueError("SequenceStream states: no state given (one per old rank expected)")
    ours = {"seed": spec.seed, "k": spec.k, "num_shards": num_shards}
    for i, state in enumerate(states):
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, dict) else state
            raise ValueError(f"SequenceStream state {i}: unsupported version {found!r}")
        for key in SAME_RUN_KEYS:
            if state.get(key) != ours[key]:
                raise ValueError(f"SequenceStream state {i}: {key} = {state.get(key)!r} but this stream has "
                                 f"{ours[key]!r}")
    world, loader_workers = states[0]["world_size"], states[0]["num_workers"]
    ranks = sorted(s["rank"] for s in states)
    if any(s["world_size"] != world or s["num_workers"] != loader_workers for s in states) \
            or ranks != list(range(world)):
        raise ValueError(f"SequenceStream states: expected the states of all ranks 0..{world - 1} of one run, got "
                         f"ranks {ranks} of world sizes {sorted({s['world_size'] for s in states})}")
    return world, loader_workers


def consumed_in_pass(spec: StreamSpec, state: dict, worker: int, sets: ClassSampleSets) -> dict[int, tuple[int, set]]:
    """Old consumer (state's rank, `worker`): per class it drew from (a share of at least K samples, not
    dropped), (its pass, the ids it had consumed in that pass); a class it had not touched yet is in pass 0
    with nothing consumed."""
    workers = max(state["num_workers"], 1)
    key = [state["seed"], state["rank"], state["world_size"], workers, worker]
    plan = plan_units(spec.manifest, list(spec.shards), state["rank"] * workers + worker,
                      state["world_size"] * workers)
    record = state["workers"][worker]
    bad, dead = set(record.get("bad", [])), set(record.get("dead", []))
    out = {}
    for cls, units in plan.items():
        if cls in dead or sum(unit_size(spec.manifest, u) for u in units) < spec.k:
            continue
        cls_state = record["classes"].get(str(cls), {"epoch": 0, "unit": 0, "offset": 0, "buffer": []})
        epoch, position, offset = int(cls_state["epoch"]), int(cls_state["unit"]), int(cls_state["offset"])
        if position >= len(units):  # the whole share was read: the next pass has consumed nothing yet
            out[cls] = (epoch + 1, set())
            continue
        order = unit_order(key, cls, epoch, len(units))
        read: set[int] = set()
        for pos in range(position + 1):
            unit = units[order[pos]]
            if unit.shard not in bad:
                ids = unit_ids(spec.manifest, unit)
                read.update(ids if pos < position else ids[:offset])
        if cls_state.get("skip"):
            read |= sets.decode(cls, cls_state["skip"])
        out[cls] = (epoch, read - set(int(i) for i in cls_state["buffer"]))
    return out


def resized_worker_states(spec: StreamSpec, states: Sequence[dict], num_shards: int) -> tuple[int, list[dict]]:
    """The states this stream's loader workers start from after a resize -> (batch count, worker states).

    Every new consumer gets the same per-class start (lowest old pass, skip = union of what was consumed),
    the union of the corrupt shards found so far, and a batch counter that continues from the highest old
    one, so the seeds of its class choices are new and reproducible."""
    check_old_states(states, spec, num_shards)
    sets = ClassSampleSets(spec.manifest)
    passes: dict[int, list[int]] = {}
    consumed: dict[int, set] = {}
    bad: set[int] = set()
    batch = 0
    for state in states:
        for worker, record in enumerate(state["workers"]):
            bad.update(int(s) for s in record.get("bad", []))
            batch = max(batch, int(record["batch"]))
            for cls, (epoch, ids) in consumed_in_pass(spec, state, worker, sets).items():
                passes.setdefault(cls, []).append(epoch)
                consumed.setdefault(cls, set()).update(ids)
    classes = {}
    for cls in sorted(passes):
        if min(passes[cls]) == 0 and not consumed[cls]:
            continue  # a fresh class: no entry, as in a new stream
        entry = {"epoch": min(passes[cls]), "unit": 0, "offset": 0, "buffer": []}
        if consumed[cls]:
            entry["skip"] = sets.encode(cls, consumed[cls])
        classes[str(cls)] = entry
    worker_state = {"batch": batch, "classes": classes, "bad": sorted(bad), "dead": []}
    return batch, [{**worker_state, "classes": dict(classes)} for _ in range(spec.workers)]
