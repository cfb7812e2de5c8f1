"""Streaming detokenizer: the streamed text must be sentencepiece's decode of the same ids, byte for byte."""

from __future__ import annotations

import random

import pytest

from llmpack.runtime.detokenizer import StreamingDetokenizer, decode_byte_run


def stream(tokenizer, ids: list[int]) -> list[str]:
    """Each add() result, then flush()'s."""
    detok = StreamingDetokenizer(tokenizer)
    return [detok.add(i) for i in ids] + [detok.flush()]


def byte_ids(tokenizer, data: bytes) -> list[int]:
    return [tokenizer.piece_to_id(f"<0x{b:02X}>") for b in data]


def assert_streams_like_decode(tokenizer, ids: list[int]) -> None:
    parts = stream(tokenizer, ids)
    expected = tokenizer.decode(ids)
    assert "".join(parts) == expected
    # Every emitted prefix is final: a later token never rewrites text already sent.
    sent = ""
    for part in parts:
        sent += part
        assert expected.startswith(sent)


def test_byte_ids_helper_points_at_byte_pieces(any_tokenizer):
    ids = byte_ids(any_tokenizer, b"\x00\xff")
    assert [any_tokenizer.id_to_piece(i) for i in ids] == ["<0x00>", "<0xFF>"]


TEXTS = [
    "Hello world",
    " leading space",
    "  two leading spaces and trailing  ",
    "emoji 🙂👍🏽 and flags 🇫🇷",
    "CJK 你好世界, かな, 한국어",
    "é à ü ß",
    "\nstarts with newline",
    "tabs\tand\nnewlines\n\n",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral plane",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encoded_text_streams_back(any_tokenizer, text):
    ids = any_tokenizer.encode(text)
    assert_streams_like_decode(any_tokenizer, ids)
    assert_streams_like_decode(any_tokenizer, [any_tokenizer.bos_id, *ids, any_tokenizer.eos_id])


def test_e_acute_split_over_byte_tokens_is_never_emitted_half(any_tokenizer):
    ids = byte_ids(any_tokenizer, "é".encode())  # <0xC3> <0xA9>
    assert stream(any_tokenizer, ids) == ["", "é", ""]


def test_emoji_from_four_byte_tokens(any_tokenizer):
    ids = byte_ids(any_tokenizer, "🙂".encode())
    assert stream(any_tokenizer, ids) == ["", "", "", "🙂", ""]


def test_cjk_from_byte_tokens_after_a_word(llama2_tokenizer):
    hello = llama2_tokenizer.encode("Hello")
    ids = hello + byte_ids(llama2_tokenizer, "你".encode())
    assert stream(llama2_tokenizer, ids) == ["Hello", "", "", "你", ""]
    assert_streams_like_decode(llama2_tokenizer, ids)


def test_leading_space_piece_is_dropped_once(llama2_tokenizer):
    space, hello = llama2_tokenizer.piece_to_id("\u2581"), llama2_tokenizer.encode("Hello")[0]
    two_spaces = llama2_tokenizer.piece_to_id("\u2581\u2581")
    assert stream(llama2_tokenizer, [space, space, hello]) == ["", " ", " Hello", ""]
    assert stream(llama2_tokenizer, [two_spaces, hello]) == [" ", " Hello", ""]
    assert stream(llama2_tokenizer, [hello, hello]) == ["Hello", " Hello", ""]
    assert stream(llama2_tokenizer, [1, hello]) == ["", "Hello", ""]  # BOS is not text
    assert stream(llama2_tokenizer, [space, 1, hello]) == ["", "", " Hello", ""]


def test_text_starting_with_a_byte_token_keeps_next_space(any_tokenizer):
    hello = any_tokenizer.encode("Hello")
    ids = byte_ids(any_tokenizer, b"\n") + hello
    assert "".join(stream(any_tokenizer, ids)) == "\n Hello" == any_tokenizer.decode(ids)


def test_unknown_id_surface(any_tokenizer):
    hello = any_tokenizer.encode("Hello")
    ids = [0, *hello]
    assert "".join(stream(any_tokenizer, ids)) == " \u2047  Hello" == any_tokenizer.decode(ids)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xe2\x82", "\ufffd\ufffd"),  # cut short: one U+FFFD per byte (Python gives one in total)
        (b"\xe2\x82A", "\ufffd\ufffdA"),
        (b"\xed\xa0\x80", "\ufffd" * 3),  # surrogate
        (b"\xc0\x80", "\ufffd" * 2),  # overlong
        (b"\xf4\x90\x80\x80", "\ufffd" * 4),  # above U+10FFFF
        (b"\xef\xbf\xbd", "\ufffd"),  # a real U+FFFD
        (b"\x80\xc3\xa9", "\ufffdé"),
    ],
)
def test_invalid_bytes_follow_sentencepiece(any_tokenizer, data, expected):
    ids = byte_ids(any_tokenizer, data)
    assert any_tokenizer.decode(ids) == expected
    assert "".join(stream(any_tokenizer, ids)) == expected
    assert_streams_like_decode(any_tokenizer, ids + any_tokenizer.encode("x"))


def test_incomplete_character_waits_then_flushes():
    pending = bytearray(b"\xe2\x82")
    assert decode_byte_run(pending, final=False) == "" and pending == b"\xe2\x82"
    assert decode_byte_run(pending, final=True) == "\ufffd\ufffd" and pending == b""
    pending = bytearray(b"\xe2A")  # a non-trail byte settles it at once
    assert decode_byte_run(pending, final=False) == "\ufffdA"


def _random_ids(rng: random.Random, tokenizer, byte_base: int) -> list[int]:
    """Mixes that stress every rule: valid and broken UTF-8 in byte pieces, BOS/EOS/unk, "▁"."""
    ids: list[int] = []
    for _ in range(rng.randint(0, 10)):
        roll = rng.random()
        if roll < 0.25:
            ranges = [(0x80, 0x7FF), (0x800, 0xD7FF), (0x10000, 0x10FFFF)]  # 2-, 3- and 4-byte forms
            data = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(2)).encode()
            data = data[: rng.randint(1, len(data))] if rng.random() < 0.3 else data
            ids += [byte_base + b for b in data]
        elif roll < 0.35:
            ids.append(byte_base + rng.randrange(256))
        elif roll < 0.5:
            ids.append(rng.choice([0, 1, 2, tokenizer.piece_to_id("\u2581")]))
        else:
            ids.append(rng.randrange(tokenizer.vocab_size))
    return ids


def test_random_sequences_match_sentencepiece_decode(any_tokenizer):
    rng = random.Random(1234)
    byte_base = any_tokenizer.piece_to_id("<0x00>")
    checked = 0
    for _ in range(3000):
        ids = _random_ids(rng, any_tokenizer, byte_base)
        assert "".join(stream(any_tokenizer, ids)) == any_tokenizer.decode(ids), ids
        checked += len(ids)
    assert checked > 10_000


def test_random_sequences_emit_only_final_text(llama2_tokenizer):
    rng = random.Random(99)
    byte_base = llama2_tokenizer.piece_to_id("<0x00>")
    for _ in range(300):
        assert_streams_like_decode(llama2_tokenizer, _random_ids(rng, llama2_tokenizer, byte_base))


def test_real_text_round_trip_long(llama2_tokenizer):
    text = " ".join(TEXTS) * 20
    ids = llama2_tokenizer.encode(text)
    assert "".join(stream(llama2_tokenizer, ids)) == text
