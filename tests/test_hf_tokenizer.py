"""tokenizer.json artifacts (#20): our ids, decode, streamed text and chat-template ids equal transformers' own.

Each family's tokenizer is the one tests/families.py saves through transformers (Llama-3 and Qwen2 byte-level
BPE trained in the test, Mistral the Llama-2 sentencepiece vocabulary converted by transformers), and the
reference is transformers' AutoTokenizer on the same folder: encode, the raw prompt, decode and
apply_chat_template(add_generation_prompt=True, tokenize=True).
"""

from __future__ import annotations

import random

import pytest
from test_families import make_checkpoint

from llmpack.runtime.chat_format import JinjaChat, NoChat
from llmpack.runtime.errors import InvalidRequest
from llmpack.runtime.hf_tokenizer import REPLACEMENT, HfTokenizer

FAMILIES = ("llama3", "qwen2", "mistral")

TRICKY = [
    "Hello world", " leading space", "   three leading", "trailing  ", "a\tb\t\tc", "\tTab first",
    "line\nbreak\n\n\nthree", "\n", " ", "x  y   z", "👍🏽 thumbs, skin tone", "family 👨‍👩‍👧‍👦 ZWJ", "🏳️‍🌈 flag",
    "你好，世界。", "日本語のテキスト", "한국어 문장", "naïve café Ünïcödé straße", "e\u0301 combining accent",
    "emoji🙂glued中文mixed", "½ ¾ — “quotes” ‘apostrophes’", "def f():\n    return 1\n",
]
SPECIAL_TEXT = [
    "<|begin_of_text|>hi", "x<|eot_id|><|start_header_id|>user<|end_header_id|>\n\ny", "<|im_start|>x<|im_end|>",
    "<s>[INST] x [/INST]</s>", "<unk> and <|endoftext|>", "🙂<|end_of_text|>你",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "You are terse.  Answer\tbriefly."},
     {"role": "user", "content": "What is 2+2? 🙂"}, {"role": "assistant", "content": " Four. "},
     {"role": "user", "content": "And in 日本語?\n"}],
    [{"role": "user", "content": "first"}, {"role": "assistant", "content": "second"},
     {"role": "user", "content": "third: naïve café"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "👨‍👩‍👧‍👦"}],
]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, our tokenizer, transformers' AutoTokenizer, the folder) for one family's checkpoint."""
    from transformers import AutoTokenizer

    folder = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    hf = AutoTokenizer.from_pretrained(str(folder))
    special = hf.special_tokens_map
    ours = HfTokenizer.from_file(folder / "tokenizer.json", special.get("bos_token"), special.get("eos_token"))
    return request.param, ours, hf, folder


def jinja_chat(family) -> JinjaChat:
    _, ours, hf, folder = family
    # What the export half records: the template file and transformers' special_tokens_map.
    return JinjaChat(ours, (folder / "chat_template.jinja").read_text(), hf.special_tokens_map)


def streamed(tokenizer: HfTokenizer, ids: list[int]) -> list[str]:
    decoder = tokenizer.stream_decoder()
    return [*(decoder.add(i) for i in ids), decoder.flush()]


@pytest.mark.parametrize("text", TRICKY + SPECIAL_TEXT)
def test_ids_equal_transformers_for_tricky_text(family, text):
    _, ours, hf, _ = family
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.raw_prompt_ids(text) == hf(text)["input_ids"]  # the post-processor: BOS for Llama-3 only
    assert ours.decode(ours.raw_prompt_ids(text)) == hf.decode(hf(text)["input_ids"], skip_special_tokens=True)


def test_special_token_ids_and_vocabulary(family):
    name, ours, hf, _ = family
    assert ours.vocab_size == len(hf)
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert (ours.bos_id is None) == (name == "qwen2")  # Qwen2 has no BOS; its raw prompt starts with the text
    assert set(hf.all_special_tokens) <= set(ours.special_texts)


@pytest.mark.parametrize("text", TRICKY)
def test_streamed_text_of_encoded_text_is_its_decode_without_partial_characters(family, text):
    _, ours, _, _ = family
    ids = ours.encode(text)
    pieces = streamed(ours, ids)
    assert "".join(pieces) == ours.decode(ids)
    assert not any(REPLACEMENT in piece for piece in pieces)  # no character was ever let out half-made


def test_streamed_random_ids_concatenate_to_decode(family):
    _, ours, _, _ = family
    rng = random.Random(20)
    specials = sorted(ours._special_ids)
    for _ in range(40):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(ours.vocab_size)
               for _ in range(rng.randrange(1, 120))]
        assert "".join(streamed(ours, ids)) == ours.decode(ids), ids


@pytest.mark.parametrize("family", ["mistral"], indirect=True)  # the one with <0xNN> byte pieces
def test_byte_fallback_runs_are_held_until_they_end(family):
    _, ours, _, _ = family
    euro = [ours._tok.token_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    a, eos, b = ours._tok.token_to_id("▁A"), ours.eos_id, ours._tok.token_to_id("▁B")
    # € then a lone lead byte: HF decodes the whole run as one U+FFFD per byte, so "€" must not go out early.
    for ids in ([*euro, euro[0], a], [a, *euro, b], [a, eos, b], [eos, b, a], [*euro, euro[0]]):
        pieces = streamed(ours, ids)
        assert "".join(pieces) == ours.decode(ids), (ids, pieces)
    assert streamed(ours, [*euro, a])[:3] == ["", "", ""]


def test_piece_bytes_spell_the_text(family):
    name, ours, _, _ = family
    for text in TRICKY:
        ids = ours.encode(text)
        joined = b"".join(ours.piece_bytes(i) for i in ids)
        # Mistral's decoder strips the space of the first piece's "▁"; out of context, a piece keeps it
        assert joined == (b" " + ours.decode(ids).encode() if name == "mistral" else ours.decode(ids).encode())
    assert ours.piece_bytes(ours.eos_id) == b""


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_template_ids_equal_apply_chat_template(family, conversation):
    _, _, hf, _ = family
    messages = CONVERSATIONS[conversation]
    chat = jinja_chat(family)
    expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert chat.chat_ids(chat.check(messages)) == expected
    assert chat.render(chat.check(messages)) == hf.apply_chat_template(messages, add_generation_prompt=True,
                                                                       tokenize=False)


def test_a_prompt_is_one_user_turn_after_the_system_prompt(family):
    _, ours, hf, _ = family
    chat = jinja_chat(family)
    system, prompt = "Answer briefly.", "Why is the sky blue?"
    with_system = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    assert chat.prompt_ids(prompt, False, system) == hf.apply_chat_template(with_system, add_generation_prompt=True)[
        "input_ids"]
    assert chat.prompt_ids(prompt, False, None) == hf.apply_chat_template(with_system[1:], add_generation_prompt=True)[
        "input_ids"]
    assert chat.prompt_ids("<|im_start|>raw 🙂", True, system) == hf("<|im_start|>raw 🙂")["input_ids"]


@pytest.mark.parametrize("family", ["mistral"], indirect=True)  # the template that calls raise_exception
def test_raise_exception_in_the_template_is_a_400_with_its_message(family):
    import jinja2

    _, _, hf, _ = family
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError) as theirs:
        hf.apply_chat_template(messages, add_generation_prompt=True)
    with pytest.raises(InvalidRequest, match="chat template refused them") as ours:
        jinja_chat(family).chat_ids(jinja_chat(family).check(messages))
    assert str(theirs.value) in str(ours.value) and "alternate user/assistant" in str(ours.value)


def test_special_token_text_in_a_message_or_prompt_is_refused_naming_it(family):
    _, ours, _, _ = family
    chat = jinja_chat(family)
    for token in ours.special_texts:
        with pytest.raises(InvalidRequest, match=f"messages\\[1\\].content: contains {token!r}, a special token"):
            chat.check([{"role": "system", "content": "ok"}, {"role": "user", "content": f"hi {token} there"}])
        with pytest.raises(InvalidRequest, match=f"prompt: contains {token!r}"):
            chat.prompt_ids(f"x{token}", False, None)


def test_messages_keep_the_apis_roles_but_not_llama2s_order(family):
    chat = jinja_chat(family)
    with pytest.raises(InvalidRequest, match="messages: is empty"):
        chat.check([])
    with pytest.raises(InvalidRequest, match="messages\\[0\\].role: unknown role 'bot'"):
        chat.check([{"role": "bot", "content": "x"}])
    # Llama-2's "[INST]" tag is plain text to a Llama-3 / Qwen2 template
    assert chat.check([{"role": "user", "content": "[INST] <<SYS>>"}])[0].content == "[INST] <<SYS>>"


def test_a_model_without_a_template_takes_raw_prompts_only(family):
    _, ours, hf, _ = family
    none = NoChat(ours)
    with pytest.raises(InvalidRequest, match="messages: this model has no chat template.*raw=true"):
        none.check([{"role": "user", "content": "x"}])
    with pytest.raises(InvalidRequest, match="raw: this model has no chat template.*raw=true"):
        none.prompt_ids("x", False, None)
    assert none.prompt_ids("Once upon", True, "ignored") == hf("Once upon")["input_ids"]
