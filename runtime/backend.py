"""Generation stage 2: the backend interface — the only thing the decode loop knows about inference.

A backend owns one sequence's KV cache: `prefill` starts it from prompt ids, `decode` appends one
token, `reset` frees it. Both return float32 logits [vocab] for the last position. ONNX Runtime and
TensorRT implement it; the loop, sampler and template never know which one runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Backend(Protocol):
    name: str
    context_length: int  # the most tokens (prompt + generated) the KV cache can hold
    vocab_size: int

    @property
    def cached_tokens(self) -> int:
        """How many tokens the KV cache holds now."""
        ...

    def prefill(self, token_ids: Sequence[int]) -> np.ndarray:
        """Drop any previous sequence, run the prompt, return the last position's logits."""
        ...

    def decode(self, token_id: int) -> np.ndarray:
        """Append one token to the cached sequence and return its logits."""
        ...

    def reset(self) -> None:
        """Free the sequence's KV cache."""
        ...
