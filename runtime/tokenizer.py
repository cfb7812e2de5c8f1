"""Text <-> token ids: the first and last step of the pipeline, a thin layer over sentencepiece.

Used the way Meta's reference llama code uses it: `encode` never adds BOS/EOS (callers add those
as ids, so "<s>" typed by a user stays text), `decode` is sentencepiece's own decode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import sentencepiece as spm

from llmpack.runtime.errors import ArtifactError

SPACE_SYMBOL = "\u2581"  # "▁", sentencepiece's visible stand-in for a space


class StreamDecoder(Protocol):
    """Generated ids -> text in pieces: everything add and flush return, concatenated, is decode(all ids)."""

    def add(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class TextTokenizer(Protocol):
    """What the engine, the chat formats and the serve wing use of a tokenizer, whichever library reads it:
    this file's sentencepiece Tokenizer (Llama-2) or hf_tokenizer.HfTokenizer (tokenizer.json)."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def raw_prompt_ids(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def piece_bytes(self, token_id: int) -> bytes: ...

    def stream_decoder(self) -> StreamDecoder: ...


class Tokenizer:
    """A loaded sentencepiece model plus the per-piece facts streaming detokenization needs."""

    def __init__(self, processor: spm.SentencePieceProcessor, source: str = "<memory>"):
        self._sp = processor
        self.source = source
        self.vocab_size: int = processor.get_piece_size()
        self.bos_id: int = processor.bos_id()
        self.eos_id: int = processor.eos_id()
        self.unk_id: int = processor.unk_id()
        # The unknown surface can be customised per model (trainer_spec.unk_surface); ask sp for it.
        self.unk_surface: str = processor.decode([self.unk_id]) if self.unk_id >= 0 else ""
        self.strips_leading_space, self.strips_all_leading_spaces = self._probe_leading_space()

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(
                f"tokenizer file {path} does not exist; point at the artifact's tokenizer.model "
                "or rebuild the artifact"
            )
        try:
            processor = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise ArtifactError(
                f"tokenizer file {path} is not a sentencepiece model ({exc}); rebuild the artifact"
            ) from exc
        return cls(processor, source=str(path))

    # --- the reference-code interface ---------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without BOS/EOS; special-token spellings in the text stay plain text."""
        return list(self._sp.encode(text))

    def raw_prompt_ids(self, text: str) -> list[int]:
        """A raw prompt: BOS then the text, as Meta's reference code builds it."""
        return [self.bos_id, *self.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    def stream_decoder(self) -> StreamDecoder:
        # Imported here: the detokenizer module imports this one for its piece facts.
        from llmpack.runtime.detokenizer import StreamingDetokenizer

        return StreamingDetokenizer(self)

    # --- per-piece facts ----------------------------------------------------------------------

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece such as "▁" or "<0x0A>"; unk_id when there is no such piece."""
        return self._sp.piece_to_id(piece)

    def id_to_piece(self, token_id: int) -> str:
        self._check_id(token_id)
        return self._sp.id_to_piece(token_id)

    def is_control(self, token_id: int) -> bool:
        self._check_id(token_id)
        return bool(self._sp.is_control(token_id))

    def is_unknown(self, token_id: int) -> bool:
        self._check_id(token_id)
        return bool(self._sp.is_unknown(token_id))

    def byte_value(self, token_id: int) -> int | None:
        """The byte a byte-fallback piece `<0xNN>` stands for, None for every other piece."""
        self._check_id(token_id)
        if not self._sp.is_byte(token_id):
            return None
        return int(self._sp.id_to_piece(token_id)[3:5], 16)

    def piece_text(self, token_id: int) -> str:
        """What the piece shows in the middle of a text; byte pieces give "" (see byte_value)."""
        self._check_id(token_id)
        if self._sp.is_control(token_id) or self._sp.is_byte(token_id):
            return ""
        if self._sp.is_unknown(token_id):
            return self.unk_surface
        return self._sp.id_to_piece(token_id).replace(SPACE_SYMBOL, " ")

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes one token adds to a stream, out of context (no leading-space stripping)."""
        value = self.byte_value(token_id)
        if value is not None:
            return bytes([value])
        return self.piece_text(token_id).encode("utf-8")

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            # IndexError, like sentencepiece itself, so callers treat both the same way.
            raise IndexError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")

    def _probe_leading_space(self) -> tuple[bool, bool]:
        """Ask sentencepiece how it treats a leading "▁" instead of parsing the model proto.

        With add_dummy_prefix (or remove_extra_whitespaces) decode drops the "▁" that starts the
        first piece; with remove_extra_whitespaces it keeps dropping them while the text is empty.
        """
        space = self.piece_to_id(SPACE_SYMBOL)
        if space == self.unk_id or self._sp.is_control(space) or self._sp.is_byte(space):
            return True, False  # no "▁" piece to probe with: sentencepiece's defaults
        return self._sp.decode([space]) == "", self._sp.decode([space, space]) == ""
