"""One class of one stream consumer: passes (epochs) over its shard units feeding an in-class shuffle buffer.

A reader resumed on another world size (`resume.py`) starts a pass with the sample ids the old consumers
had drawn in theirs (`skip`): it reads every other sample of its units once in that pass, and whole units
that hold only skipped samples are not fetched at all. The next pass reads everything again.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .units import SAMPLE_BITS, _Unit, unit_ids, unit_order, unit_size

if TYPE_CHECKING:
    from .consumer import ConsumerStream


class ClassDead(RuntimeError):
    """No usable samples left for a class (all its shards corrupt)."""


class ClassReader:
    """One class of one consumer: epochs over its units feeding an in-class shuffle buffer."""

    def __init__(self, consumer: "ConsumerStream", cls: int, units: list[_Unit]):
        self.consumer, self.cls, self.units = consumer, cls, units
        self.owned = sum(unit_size(consumer.manifest, u) for u in units)
        self.epoch, self.unit_pos, self.offset = 0, 0, 0
        # The shuffle buffer: sample ids and their samples, position by position (the ids are copied
        # into the state after every batch, so they are kept as a list of their own).
        self.buffer_ids: list[int] = []
        self.buffer: list[np.ndarray] = []
        self.current = None  # the open unit's (sample ids, decoded samples)
        self.pending_ids: list[int] | None = None  # buffered ids to re-read after load_state
        self.skip: set[int] | None = None  # ids not to read in this pass (consumed before a resize)
        self.skip_text: str | None = None  # ... as stored in the state
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            self._orders[epoch] = unit_order(self.consumer.key, self.cls, epoch, len(self.units))
        return self._orders[epoch]

    def state(self) -> dict:
        ids = self.pending_ids if self.pending_ids is not None else self.buffer_ids
        state = {"epoch": self.epoch, "unit": self.unit_pos, "offset": self.offset, "buffer": list(ids)}
        if self.skip_text is not None:
            state["skip"] = self.skip_text
        return state

    def load_state(self, state: dict) -> None:
        self.epoch, self.unit_pos, self.offset = int(state["epoch"]), int(state["unit"]), int(state["offset"])
        self.pending_ids, self.buffer_ids, self.buffer, self.current = [int(i) for i in state["buffer"]], [], [], None
        self.skip_text = state.get("skip")
        self.skip = self.consumer.sample_sets().decode(self.cls, self.skip_text) if self.skip_text else None

    def _materialize(self) -> None:
        """Re-read the samples a restored buffer refers to (lazily, on first use)."""
        ids, self.pending_ids = self.pending_ids, None
        arrays: dict[int, np.ndarray] = {}
        for shard in sorted({i >> SAMPLE_BITS for i in ids}):
            unit = next((u for u in self.units if u.shard == shard), _Unit(shard, 0, 1))
            loaded = self.consumer.load_unit(unit, allow_bad=True)
            if loaded is not None:  # None: the shard went bad
                arrays.update(zip(*loaded))
        self.buffer_ids = [i for i in ids if i in arrays]
        self.buffer = [arrays[i] for i in self.buffer_ids]

    def _skipped_whole(self, unit: _Unit) -> bool:
        """Every sample of `unit` was consumed earlier in this pass (before a resize)."""
        return self.skip is not None and self.skip.issuperset(unit_ids(self.consumer.manifest, unit))

    def _upcoming(self) -> _Unit | None:
        """The unit this class reads after the current one (for prefetch)."""
        pos = self.unit_pos + 1
        while pos < len(self.units) and self._skipped_whole(self.units[self.order(self.epoch)[pos]]):
            pos += 1
        if pos < len(self.units):
            return self.units[self.order(self.epoch)[pos]]
        return self.units[self.order(self.epoch + 1)[0]] if self.units else None

    def _fill(self, count: int) -> None:
        """Append this class's next `count` samples (its units in epoch order) to the buffer, a run of
        one unit at a time."""
        bad_run = 0
        while count > 0:
            if self.unit_pos >= len(self.units):
                self.epoch, self.unit_pos, self.offset = self.epoch + 1, 0, 0
                self.skip = self.skip_text = None
            if self.current is None:
                unit = self.units[self.order(self.epoch)[self.unit_pos]]
                if self._skipped_whole(unit):
                    self.unit_pos, self.offset = self.unit_pos + 1, 0
                    continue
                self.current = self.consumer.open_unit(unit, self._upcoming())
                if self.current is None:
                    bad_run += 1
                    if bad_run > len(self.units):
                        raise ClassDead(self.cls)
                    self.unit_pos, self.offset = self.unit_pos + 1, 0
                    continue
            ids, samples = self.current
            if self.offset < len(ids):
                count -= self._take(ids, samples, count)
                bad_run = 0
            else:
                self.current, self.unit_pos, self.offset = None, self.unit_pos + 1, 0

    def _take(self, ids: list[int], samples: list[np.ndarray], count: int) -> int:
        """Move up to `count` samples of the open unit, from `offset` on, into the buffer (leaving out
        skipped ones); returns how many moved."""
        if self.skip is None:
            end = min(self.offset + count, len(ids))
            self.buffer_ids.extend(ids[self.offset: end])
            self.buffer.extend(samples[self.offset: end])
            moved, self.offset = end - self.offset, end
            return moved
        moved = 0
        while self.offset < len(ids) and moved < count:
            if ids[self.offset] not in self.skip:
                self.buffer_ids.append(ids[self.offset])
                self.buffer.append(samples[self.offset])
                moved += 1
            self.offset += 1
        return moved

    def _pick(self, k: int, rng: np.random.Generator) -> list[int] | None:
        """K buffer positions holding distinct sample ids, in random order; None if impossible."""
        ids = self.buffer_ids
        order = rng.permutation(len(ids))
        chosen = order[:k].tolist()
        if len({ids[p] for p in chosen}) == k:  # the usual case: the first K ids are already distinct
            return chosen
        chosen, seen = [], set()
        for p in order.tolist():
            sample_id = ids[p]
            if sample_id not in seen:
                seen.add(sample_id)
                chosen.append(p)
                if len(chosen) == k:
                    return chosen
        return None

    def draw(self, k: int, rng: np.random.Generator) -> list[np.ndarray]:
        """K samples with distinct ids, removed from the buffer (refilled first)."""
        if self.pending_ids is not None:
            self._materialize()
        # Never buffer more than one pass of this class: keeps draws close to once per epoch.
        capacity = max(min(self.consumer.spec.data.shuffle_buffer, self.owned), k)
        self._fill(capacity - len(self.buffer))
        reads = 0
        while (chosen := self._pick(k, rng)) is None:  # duplicates across an epoch boundary
            self._fill(1)
            reads += 1
            if reads > 2 * self.owned + capacity:
                raise ClassDead(self.cls)
        out = [self.buffer[p] for p in chosen]
        ids, buffer = self.buffer_ids, self.buffer
        for p in sorted(chosen, reverse=True):
            ids[p], buffer[p] = ids[-1], buffer[-1]
            ids.pop()
            buffer.pop()
        return out
