"""Tokenizer: reference-code semantics over the real Llama-2 and stories260k sentencepiece models."""

from __future__ import annotations

import pytest

from llmpack.runtime.errors import ArtifactError
from llmpack.runtime.tokenizer import Tokenizer


def test_llama2_basic_facts(llama2_tokenizer):
    assert llama2_tokenizer.vocab_size == 32000
    assert (llama2_tokenizer.bos_id, llama2_tokenizer.eos_id, llama2_tokenizer.unk_id) == (1, 2, 0)
    assert llama2_tokenizer.strips_leading_space is True
    assert llama2_tokenizer.strips_all_leading_spaces is False


def test_encode_matches_sentencepiece_and_adds_no_bos_eos(llama2_tokenizer, llama2_sp):
    text = "Hello, world! Ünïcödé 你好 🙂"
    ids = llama2_tokenizer.encode(text)
    assert ids == llama2_sp.encode(text)
    assert ids[0] != llama2_tokenizer.bos_id and ids[-1] != llama2_tokenizer.eos_id
    assert llama2_tokenizer.encode("Hello") == [15043]
    assert llama2_tokenizer.encode("") == []


def test_special_token_spelling_is_plain_text(llama2_tokenizer):
    # sentencepiece semantics: control pieces are never produced from text.
    ids = llama2_tokenizer.encode("<s>hi</s>")
    assert llama2_tokenizer.bos_id not in ids and llama2_tokenizer.eos_id not in ids
    assert llama2_tokenizer.encode("<s>") == [529, 29879, 29958]  # "▁<", "s", ">"
    assert llama2_tokenizer.decode(ids) == "<s>hi</s>"


def test_decode_round_trip_and_control_ids(llama2_tokenizer):
    text = "The quick brown fox\njumps  over é and 🙂."
    ids = llama2_tokenizer.encode(text)
    assert llama2_tokenizer.decode(ids) == text
    assert llama2_tokenizer.decode([1, *ids, 2]) == text


def test_piece_bytes(any_tokenizer):
    tok = any_tokenizer
    byte_a = tok.encode("\n")[-1]  # newline is a byte-fallback piece in both models
    assert tok.piece_bytes(byte_a) == b"\n"
    assert tok.byte_value(byte_a) == 0x0A
    assert tok.piece_bytes(tok.bos_id) == b"" and tok.piece_bytes(tok.eos_id) == b""
    assert tok.piece_bytes(tok.unk_id) == " \u2047 ".encode()
    space_piece = tok.encode("Once")[-1]  # "▁Once" in both models
    assert tok.id_to_piece(space_piece) == "\u2581Once"
    assert tok.piece_bytes(space_piece) == tok.id_to_piece(space_piece).replace("\u2581", " ").encode()
    assert tok.piece_bytes(space_piece).startswith(b" ")


def test_piece_bytes_of_every_byte_piece(any_tokenizer):
    values = [any_tokenizer.byte_value(i) for i in range(any_tokenizer.vocab_size)]
    byte_ids = [i for i, v in enumerate(values) if v is not None]
    assert len(byte_ids) == 256
    assert sorted(any_tokenizer.piece_bytes(i) for i in byte_ids) == [bytes([b]) for b in range(256)]


def test_llama2_piece_bytes_examples(llama2_tokenizer):
    assert llama2_tokenizer.piece_bytes(15043) == b" Hello"
    assert llama2_tokenizer.piece_bytes(3 + 0xE9) == b"\xe9"  # <0xE9>


def test_out_of_range_id(llama2_tokenizer):
    with pytest.raises(IndexError, match="32000"):
        llama2_tokenizer.piece_bytes(32000)
    with pytest.raises(IndexError):
        llama2_tokenizer.piece_bytes(-1)


def test_missing_file_is_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "nope.model")


def test_garbage_file_is_artifact_error(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="not a sentencepiece model"):
        Tokenizer.from_file(bad)


def test_stories_tokenizer_facts(stories_tokenizer):
    assert stories_tokenizer.vocab_size == 512
    assert (stories_tokenizer.bos_id, stories_tokenizer.eos_id) == (1, 2)
    assert stories_tokenizer.decode(stories_tokenizer.encode("Once upon a time")) == "Once upon a time"
