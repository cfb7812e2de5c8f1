"""Token ids -> text while generating: turns each sampled id into the text it completes, for streaming.

The concatenation of everything `add` and `flush` return equals `Tokenizer.decode(all_ids)`, because
this is sentencepiece's own decode (sentencepiece_processor.cc, `Decode`) unrolled into a stream:

- a run of byte-fallback pieces is decoded as UTF-8 one character at a time; a byte that does not
  start a valid character (bad lead, bad trail byte, overlong form, surrogate, > U+10FFFF, or a
  sequence cut short by a non-byte piece or the end) becomes one U+FFFD and decoding resumes at
  the very next byte — so b"\\xe2\\x82" gives two U+FFFD, where Python's decoder gives one;
- the "▁" that starts the first visible piece is dropped (the dummy prefix); control pieces
  (BOS/EOS) are invisible and do not count as text, so "<s>▁Hi" decodes to "Hi";
- the unknown piece decodes to its surface (" ⁇ " by default).
"""

from __future__ import annotations

from llmpack.runtime.tokenizer import SPACE_SYMBOL, Tokenizer

REPLACEMENT = "\ufffd"

# (mask, pattern, length, smallest code point that needs that length) by lead byte.
_SEQUENCE_FORMS = ((0x80, 0x00, 1, 0), (0xE0, 0xC0, 2, 0x80), (0xF0, 0xE0, 3, 0x800), (0xF8, 0xF0, 4, 0x10000))


def _sequence_length(lead: int) -> tuple[int, int]:
    """Bytes the character starting with `lead` needs and its minimum code point; (0, 0) if none."""
    for mask, pattern, length, minimum in _SEQUENCE_FORMS:
        if lead & mask == pattern:
            return length, minimum
    return 0, 0


def _is_trail(byte: int) -> bool:
    return byte & 0xC0 == 0x80


def _decode_char(data: bytearray, length: int, minimum: int) -> str | None:
    """The character in data[:length] if sentencepiece accepts it, else None."""
    code = data[0] & (0xFF >> (length + 1) if length > 1 else 0x7F)
    for byte in data[1:length]:
        if not _is_trail(byte):
            return None
        code = (code << 6) | (byte & 0x3F)
    valid = code >= minimum and (code < 0xD800 or 0xE000 <= code <= 0x10FFFF)
    return chr(code) if valid else None


def decode_byte_run(pending: bytearray, final: bool) -> str:
    """Decode and remove the complete characters at the front of `pending`.

    Unless `final`, a character whose bytes may still arrive is left in `pending`.
    """
    out: list[str] = []
    while pending:
        length, minimum = _sequence_length(pending[0])
        complete = 0 < length <= len(pending)
        # Waiting is only worth it while the bytes so far can still form a character.
        if length > len(pending) and not final and all(_is_trail(b) for b in pending[1:]):
            break
        char = _decode_char(pending, length, minimum) if complete else None
        if char is None:
            out.append(REPLACEMENT)
            del pending[0]
        else:
            out.append(char)
            del pending[:length]
    return "".join(out)


class StreamingDetokenizer:
    """Feed generated ids one at a time; get back only text that can no longer change."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._pending = bytearray()  # bytes of byte-fallback pieces not yet forming a character
        self._text_started = False  # sentencepiece's `!text->empty()`
        self._at_start = True  # sentencepiece's `is_bos_ws`: a leading "▁" would still be dropped
        self._space_dropped = False  # sentencepiece's `bos_ws_seen`, from the previous piece

    def add(self, token_id: int) -> str:
        byte = self._tok.byte_value(token_id)
        if byte is not None:
            self._pending.append(byte)
            return self._take_bytes(final=False)
        out = self._take_bytes(final=True)
        if self._space_dropped or self._text_started:
            self._at_start = False
        text = self._piece_surface(token_id)
        self._text_started = self._text_started or bool(text)
        return out + text

    def flush(self) -> str:
        """Everything still held back; a character left incomplete comes out as U+FFFD."""
        return self._take_bytes(final=True)

    def _take_bytes(self, final: bool) -> str:
        text = decode_byte_run(self._pending, final)
        self._text_started = self._text_started or bool(text)
        return text

    def _piece_surface(self, token_id: int) -> str:
        self._space_dropped = False
        if not self._at_start or self._tok.is_control(token_id) or self._tok.is_unknown(token_id):
            return self._tok.piece_text(token_id)
        if not self._tok.strips_leading_space:
            return self._tok.piece_text(token_id)
        piece = self._tok.id_to_piece(token_id)
        if piece.startswith(SPACE_SYMBOL):
            piece = piece[len(SPACE_SYMBOL) :]
            # remove_extra_whitespaces models keep dropping leading spaces while the text is empty.
            self._space_dropped = not self._tok.strips_all_leading_spaces
        return piece.replace(SPACE_SYMBOL, " ")
