"""Generation stage 3 helper: prefix caching — a prompt that starts like an earlier sequence skips
re-reading that part.

Every `raw=false` request begins with the same template and system prompt, and each turn of a chat
resends the whole conversation so far: without this, every request pays again for tokens whose keys
and values the engine computed a moment ago. After a sequence has read its prompt (and again when
it finishes, with its answer), the batch scheduler keeps a copy of that slot's KV cache here; a new
request whose prompt shares at least MIN_PREFIX_TOKENS leading tokens with a kept sequence starts
from a copy of that much (causal attention: the first n positions of a cache depend on the first n
tokens only). At least the prompt's last token is always computed, for its logits.

Pure bookkeeping over token ids and opaque backend payloads, bounded in bytes, least recently used
out first; the backend does the copying (`Backend.export_kv` / `import_kv`).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_PREFIX_TOKENS = 8  # shorter matches (a BOS, "[INST]") save less than the copy costs to set up
DEFAULT_BUDGET_MB = 256
# A lookup compares the prompt with every kept sequence: on a small model the byte budget alone would
# allow thousands of them (stories260k: 2.5 KiB a token), and each admission would pay for the scan.
MAX_KEPT = 64


@dataclass(frozen=True)
class KeptSequence:
    ids: np.ndarray  # int64: the tokens whose keys and values `kv` holds, in order
    kv: object  # the backend's copy of that slot's cache (Backend.export_kv)
    nbytes: int


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two id arrays share."""
    n = min(len(a), len(b))
    differs = np.flatnonzero(a[:n] != b[:n])
    return int(differs[0]) if len(differs) else n


class PrefixCache:
    """Kept sequences, at most `budget_bytes` of KV copies and `max_kept` sequences in all; the least
    recently used leave first."""

    def __init__(self, budget_bytes: int, min_tokens: int = MIN_PREFIX_TOKENS, max_kept: int = MAX_KEPT):
        self.budget_bytes = budget_bytes
        self.min_tokens = min_tokens
        self.max_kept = max_kept
        self._kept: OrderedDict[int, KeptSequence] = OrderedDict()  # insertion numbers; order is recency
        self._numbers = itertools.count()
        self.nbytes = 0
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._kept)

    def lookup(self, prompt_ids: Sequence[int]) -> tuple[KeptSequence, int] | None:
        """The kept sequence sharing the longest prefix with the prompt, and how many tokens of it to
        reuse (never the prompt's last token: its logits must be computed), or None below min_tokens."""
        prompt = np.asarray(prompt_ids, dtype=np.int64)
        best, best_length = None, 0
        for key, kept in self._kept.items():
            length = min(common_prefix(kept.ids, prompt), len(prompt) - 1)
            if length > best_length:
                best, best_length = key, length
        if best is None or best_length < self.min_tokens:
            return None
        self._kept.move_to_end(best)
        self.hits += 1
        self.reused_tokens += best_length
        return self._kept[best], best_length

    def worth_keeping(self, ids: Sequence[int], nbytes: int) -> bool:
        """Whether a copy of `ids`' cache (`nbytes`) would add anything: long enough, at most half the
        budget (one long sequence must not flush everything else), and not already held in full."""
        if len(ids) < self.min_tokens or nbytes > self.budget_bytes // 2:
            return False
        candidate = np.asarray(ids, dtype=np.int64)
        return not any(len(kept.ids) >= len(candidate) and common_prefix(kept.ids, candidate) == len(candidate)
                       for kept in self._kept.values())

    def keep(self, ids: Sequence[int], kv: object, nbytes: int) -> None:
        """Hold a copy; kept sequences that are a prefix of it go (it covers them), then the least
        recently used until it fits."""
        kept = KeptSequence(np.asarray(ids, dtype=np.int64), kv, nbytes)
        for key, old in list(self._kept.items()):
            if len(old.ids) <= len(kept.ids) and common_prefix(old.ids, kept.ids) == len(old.ids):
                self._drop(key)
        while self._kept and (self.nbytes + nbytes > self.budget_bytes or len(self._kept) >= self.max_kept):
            self._drop(next(iter(self._kept)))
        self._kept[next(self._numbers)] = kept
        self.nbytes += nbytes

    def clear(self) -> None:
        for key in list(self._kept):
            self._drop(key)

    def _drop(self, key: int) -> None:
        self.nbytes -= self._kept.pop(key).nbytes
