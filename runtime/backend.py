"""Generation stage 2: the backend interface — the only thing the decode loop knows about inference.

A backend owns the KV caches of up to `max_batch` sequences, each in a numbered slot. `prefill`
appends prompt tokens to one slot (call it again to continue a chunked prompt), `decode` runs ONE
batched step that appends one token to each listed slot, `reset` frees a slot. Both return float32
logits of the last position. ONNX Runtime and TensorRT implement it; the loop, sampler and
template never know which one runs.

Optional: a backend whose `can_mix` is true also has `decode_and_prefill(slots, token_ids,
chunk_slot, chunk_ids) -> (logits [len(slots), vocab], chunk logits [vocab])`, the decode step and
one prompt chunk in a single pass over the weights (the ort-fused backend, mixed.onnx); the batch
scheduler uses it while a prompt joins running decodes, and calls the two separately otherwise.
A backend that can copy a slot's cache also has `kv_bytes(tokens)`, `export_kv(slot, length)` (a
copy of the first positions) and `import_kv(slot, copy, length)` (a reset slot starts from it): the
prefix cache (prefix_cache.py) uses them; the ONNX Runtime CPU backends have them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


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
