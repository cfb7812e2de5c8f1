"""Generation stage 2 helper: several sequences' KV caches stacked into one left-padded batch.

Rows keep their place across steps: a finished sequence's row stays as a dead row (fed a dummy
token, its output ignored) until the next sequence joins, so a leave costs nothing and a join costs
one copy of the live caches. Pure numpy; the backends feed the arrays (or their OrtValue
successors) to their sessions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DUMMY_TOKEN = 0


def as_array(value) -> np.ndarray:
    """A numpy view of an OrtValue (no copy) or the array itself."""
    return value if isinstance(value, np.ndarray) else value.numpy()


class KVBatch:
    def __init__(self, rows: list[int | None], past: list, lengths: list[int]):
        self.rows = rows  # slot of each row; None marks a dead row
        self.past = past  # per layer k/v: [rows, kv_heads, width, head_dim]
        self.lengths = lengths  # real tokens in each row; the rest of the width is left padding

    @classmethod
    def stack(cls, slots: Sequence[int], caches: Sequence[list]) -> KVBatch:
        """One copy of each cache ([1, kv, length, d] per layer) into a fresh left-padded batch."""
        arrays = [[as_array(v) for v in cache] for cache in caches]
        lengths = [cache[0].shape[2] for cache in arrays]
        width = max(lengths)
        past = []
        for index in range(len(arrays[0])):
            first = arrays[0][index]
            stacked = np.zeros((len(arrays), first.shape[1], width, first.shape[3]), dtype=first.dtype)
            for row, cache in enumerate(arrays):
                stacked[row, :, width - lengths[row] :, :] = cache[index][0]
            past.append(stacked)
        return cls(list(slots), past, lengths)

    @property
    def width(self) -> int:
        return as_array(self.past[0]).shape[2]

    @property
    def live(self) -> set[int]:
        return {slot for slot in self.rows if slot is not None}

    @property
    def dead(self) -> int:
        return sum(slot is None for slot in self.rows)

    def row_cache(self, slot: int) -> list[np.ndarray]:
        """The slot's cache as views of its row, without the padding."""
        row = self.rows.index(slot)
        pad = self.width - self.lengths[row]
        return [as_array(a)[row : row + 1, :, pad:, :] for a in self.past]

    def drop(self, slot: int) -> None:
        self.rows[self.rows.index(slot)] = None

    def step_inputs(self, tokens: dict[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids [rows, 1], attention_mask [rows, width+1], position_ids [rows, 1] for one step."""
        width = self.width
        ids = np.array([[tokens.get(slot, DUMMY_TOKEN) if slot is not None else DUMMY_TOKEN] for slot in self.rows],
                       dtype=np.int64)
        mask = np.ones((len(self.rows), width + 1), dtype=np.int64)
        for row, length in enumerate(self.lengths):
            mask[row, : width - length] = 0
        positions = np.array([[length] for length in self.lengths], dtype=np.int64)
        return ids, mask, positions

    def advance(self, present: list) -> None:
        self.past = present
        self.lengths = [length + 1 for length in self.lengths]

    def rows_of(self, slots: Sequence[int]) -> list[int]:
        return [self.rows.index(slot) for slot in slots]
