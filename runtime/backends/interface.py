"""Backends wing: the backend interface — the only thing the decode loop knows about inference.

A backend owns the KV caches of up to `max_batch` sequences, each in a numbered slot. `prefill`
appends prompt tokens to one slot (call it again to continue a chunked prompt), `decode` runs ONE
batched step that appends one token to each listed slot, `reset` frees a slot. Both return float32
logits of the last position. ONNX Runtime and TensorRT implement it; the loop, sampler and
template never know which one runs.

Optional capabilities are typed Protocols of their own, checked once when the scheduler starts
(`mixed_steps_of`, `kv_copies_of`), never probed attribute by attribute:
- MixedSteps: the decode step and one prompt chunk in a single pass over the weights (the ort-fused
  backend's mixed.onnx); the batch scheduler uses it while a prompt joins running decodes.
- KvCopies: copy a slot's first positions out and into a reset slot; the prefix cache uses it (the
  ONNX Runtime CPU backends have it).
- Speculation: a step that appends several tokens and returns the logits after each (checking
  speculated tokens in one pass over the weights), and dropping the cache's last positions (the
  rejected ones); both ONNX Runtime CPU backends have it (ort-fused: the length goes back in the in-place cache;
  standard graph: the present is cut). TensorRT builds from the standard graph but cannot feed num_logits yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from llmpack.runtime.errors import BackendError


@runtime_checkable
class Backend(Protocol):
    name: str
    context_length: int  # the most tokens (prompt + generated) one slot can hold
    vocab_size: int
    max_batch: int  # slots 0 … max_batch-1

    def cached_tokens(self, slot: int) -> int:
        """How many tokens the slot's KV cache holds now."""
        ...

    def prefill(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        """Append token_ids to the slot's sequence; logits [vocab] of the last one."""
        ...

    def decode(self, slots: Sequence[int], token_ids: Sequence[int]) -> np.ndarray:
        """Append token_ids[i] to slots[i], all in one batched step; logits [len(slots), vocab]."""
        ...

    def reset(self, slot: int) -> None:
        """Free the slot's KV cache."""
        ...


@runtime_checkable
class MixedSteps(Protocol):
    can_mix: bool  # False when the second session could not be made (memory): the capability is off

    def decode_and_prefill(self, slots: Sequence[int], token_ids: Sequence[int], chunk_slot: int,
                           chunk_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """decode(slots, token_ids) and prefill(chunk_slot, chunk_ids) in one pass over the weights:
        (logits [len(slots), vocab], chunk logits [vocab])."""
        ...


@runtime_checkable
class KvCopies(Protocol):
    def kv_bytes(self, tokens: int) -> int:
        """Bytes a copy of `tokens` cached positions takes."""
        ...

    def export_kv(self, slot: int, length: int) -> np.ndarray:
        """A copy of the slot's first `length` cached positions."""
        ...

    def import_kv(self, slot: int, kv: np.ndarray, length: int) -> None:
        """A reset slot starts from a copy export_kv made."""
        ...


@runtime_checkable
class Speculation(Protocol):
    can_score: bool  # False for artifacts whose graph gives last-position logits only

    def score(self, slot: int, token_ids: Sequence[int]) -> np.ndarray:
        """Append token_ids to the slot's sequence in one step; logits after each of them [len, vocab]."""
        ...

    def truncate(self, slot: int, length: int) -> None:
        """Keep only the slot's first `length` cached positions (drop rejected speculated tokens)."""
        ...


def check_score(can_score: bool, cached: int, token_ids: Sequence[int]) -> None:
    """What every Speculation.score requires, in one wording: a graph that returns every position's logits, a
    prefilled slot, and tokens to check."""
    if not can_score:
        raise BackendError("this artifact's graph gives last-position logits only; rebuild it to speculate")
    if cached == 0 or not token_ids:
        raise BackendError("score needs a prefilled slot and at least one token")


def check_truncate(slot: int, cached: int, length: int) -> None:
    """What every Speculation.truncate requires: it keeps at least one position and never adds any."""
    if not 0 < length <= cached:
        raise BackendError(f"slot {slot} holds {cached} tokens; cannot keep {length}")


def speculation_of(backend: Backend) -> Speculation | None:
    """The backend as Speculation when its artifact supports it, else None."""
    return backend if isinstance(backend, Speculation) and backend.can_score else None


def mixed_steps_of(backend: Backend) -> MixedSteps | None:
    """The backend as MixedSteps when it has the capability and it is on, else None."""
    return backend if isinstance(backend, MixedSteps) and backend.can_mix else None


def kv_copies_of(backend: Backend) -> KvCopies | None:
    return backend if isinstance(backend, KvCopies) else None
