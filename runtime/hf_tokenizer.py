"""Engine core: text <-> token ids for tokenizer.json artifacts (Llama-3, Qwen2, Mistral's fast tokenizer).

A thin layer over the `tokenizers` library with the surface runtime/tokenizer.py's sentencepiece
Tokenizer has (the TextTokenizer protocol there). Ids equal transformers' for the same file:
`encode` is HF `encode(text, add_special_tokens=False)` (special-token text is parsed, as HF does;
the chat formats refuse it in user text), a raw prompt goes through the file's own post-processor
(Llama-3 adds <|begin_of_text|>, Qwen2 nothing), `decode` skips special tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer as RustTokenizer

from llmpack.runtime.errors import ArtifactError

REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class HfTokenizer:
    """A loaded tokenizer.json plus what streaming and logprobs need about its pieces."""

    def __init__(self, tokenizer: RustTokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 source: str = "<memory>"):
        self._tok = tokenizer
        self.source = source
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id: int | None = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_id: int | None = tokenizer.token_to_id(eos_token) if eos_token else None
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, token in added.items() if token.special)
        # Every added token's text: typed into a message it would be parsed as that token (turn forging).
        self.special_texts: tuple[str, ...] = tuple(sorted({t.content for t in added.values()}, key=len, reverse=True))
        decoder = str(tokenizer.decoder)
        self._byte_level = "ByteLevel" in decoder  # pieces spelled in GPT-2's byte alphabet
        # ByteFallback decodes a run of <0xNN> pieces only when the run ends (all U+FFFD if it is not UTF-8).
        self._byte_fallback = "ByteFallback" in decoder
        self._byte_pieces = frozenset(
            i for piece, i in tokenizer.get_vocab().items() if _BYTE_PIECE.fullmatch(piece)
        ) if self._byte_fallback else frozenset()
        self._unicode_to_byte = {c: b for b, c in _bytes_to_unicode().items()}

    @classmethod
    def from_file(cls, path: str | Path, bos_token: str | None = None, eos_token: str | None = None) -> HfTokenizer:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"tokenizer file {path} does not exist; rebuild the artifact")
        try:
            tokenizer = RustTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception for a malformed file
            raise ArtifactError(f"tokenizer file {path} is not a tokenizer.json ({exc}); rebuild the artifact") from exc
        return cls(tokenizer, bos_token, eos_token, source=str(path))

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with no post-processor tokens; special-token text becomes its token, as in HF."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def raw_prompt_ids(self, text: str) -> list[int]:
        """A raw prompt as the tokenizer's own post-processor frames it (BOS for Llama-3, nothing for Qwen2)."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def is_byte_piece(self, token_id: int) -> bool:
        """A ByteFallback <0xNN> piece, whose text depends on the pieces after it."""
        return token_id in self._byte_pieces

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to a stream, out of context; special tokens add none (decode skips them)."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        if token_id in self._special_ids:
            return b""
        if self._byte_level and all(c in self._unicode_to_byte for c in piece):
            return bytes(self._unicode_to_byte[c] for c in piece)
        match = _BYTE_PIECE.fullmatch(piece) if self._byte_fallback else None
        if match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def stream_decoder(self) -> HfStreamDecoder:
        return HfStreamDecoder(self)


class HfStreamDecoder:
    """Feed generated ids one at a time; get back only text that can no longer change.

    The library's decode is re-run over a short window of recent ids (as tokenizers' DecodeStream does),
    and text is released only where the window's decode can no longer change: it does not end in an
    incomplete character (U+FFFD), and the last id is not a ByteFallback byte (a run that ends invalid
    decodes to one U+FFFD per byte, even bytes that first formed a character). The window's start
    moves on only past text that decoded to something, because decoders such as Mistral's strip the
    leading space of whatever comes first: after skipped special tokens that would be the next
    token's space. So everything emitted, concatenated, is `decode(all ids)`.
    """

    def __init__(self, tokenizer: HfTokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._start = 0  # where the decode window begins
        self._read = 0  # ids up to here have had their text emitted
        self._prefix_text = ""  # decode(ids[start:read])

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        if self._tok.is_byte_piece(token_id):
            return ""
        text = self._tok.decode(self._ids[self._start:])
        if text.endswith(REPLACEMENT) or not text.startswith(self._prefix_text):
            return ""
        new = text[len(self._prefix_text):]
        settled = self._tok.decode(self._ids[self._read:])
        if settled:
            self._start, self._prefix_text = self._read, settled
        else:
            self._prefix_text = text
        self._read = len(self._ids)
        return new

    def flush(self) -> str:
        """Everything still held back; a character left incomplete comes out as U+FFFD."""
        text = self._tok.decode(self._ids[self._start:])
        common = len(self._prefix_text) if text.startswith(self._prefix_text) else 0
        self._start, self._read, self._prefix_text = len(self._ids), len(self._ids), ""
        return text[common:]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE pieces are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
