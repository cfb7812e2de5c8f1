"""Chat template: ids must equal Meta's reference `chat_completion` construction, token for token."""

from __future__ import annotations

import pytest

from llmpack.runtime.errors import InvalidRequest
from llmpack.runtime.template import DEFAULT_SYSTEM_PROMPT, Message, chat_ids, prompt_ids

# --- a direct transcription of facebookresearch/llama llama/generation.py (Llama 2) -------------
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def meta_encode(sp, s: str, bos: bool, eos: bool) -> list[int]:
    t = sp.encode(s)
    if bos:
        t = [sp.bos_id()] + t
    if eos:
        t = t + [sp.eos_id()]
    return t


def meta_chat_tokens(sp, dialog: list[dict]) -> list[int]:
    if dialog[0]["role"] == "system":
        dialog = [
            {
                "role": dialog[1]["role"],
                "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
            }
        ] + dialog[2:]
    assert all([msg["role"] == "user" for msg in dialog[::2]]) and all(
        [msg["role"] == "assistant" for msg in dialog[1::2]]
    )
    dialog_tokens: list[int] = sum(
        [
            meta_encode(
                sp,
                f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ",
                bos=True,
                eos=True,
            )
            for prompt, answer in zip(dialog[::2], dialog[1::2])
        ],
        [],
    )
    assert dialog[-1]["role"] == "user"
    dialog_tokens += meta_encode(sp, f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}", bos=True, eos=False)
    return dialog_tokens


# --------------------------------------------------------------------------------------------------

DIALOGS = {
    "user only": [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    "system + user": [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": "1. The Eiffel Tower\n2. The Louvre\n3. Notre-Dame"},
        {"role": "user", "content": "What is so great about #1?"},
    ],
    "system + multi-turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "  Why did the chicken cross the road?  "},
        {"role": "user", "content": "why?"},
    ],
    "unicode": [
        {"role": "system", "content": "Réponds en français 🇫🇷"},
        {"role": "user", "content": "こんにちは、元気ですか？ 🙂 naïve café — ½ ∑"},
    ],
    "surrounding spaces": [
        {"role": "system", "content": "  padded system  \n"},
        {"role": "user", "content": "\n\t  spaced   out  question   \n"},
        {"role": "assistant", "content": "   spaced answer\n\n"},
        {"role": "user", "content": "  again  "},
    ],
    "empty contents": [
        {"role": "user", "content": ""},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "   "},
    ],
    "special-token spellings": [{"role": "user", "content": "<s> hello </s> <unk>"}],
}


@pytest.mark.parametrize("name", list(DIALOGS))
def test_chat_ids_equal_meta_reference(llama2_tokenizer, llama2_sp, name):
    dialog = DIALOGS[name]
    expected = meta_chat_tokens(llama2_sp, dialog)
    assert chat_ids(llama2_tokenizer, dialog) == expected
    assert chat_ids(llama2_tokenizer, [Message(**m) for m in dialog]) == expected


def test_chat_ids_known_values(llama2_tokenizer):
    ids = chat_ids(llama2_tokenizer, [{"role": "user", "content": "Hello"}])
    # <s> ▁[ INST ] ▁Hello ▁[ / INST ]
    assert ids == [1, 518, 25580, 29962, 15043, 518, 29914, 25580, 29962]


def test_turn_boundaries_are_bos_eos_ids(llama2_tokenizer):
    ids = chat_ids(llama2_tokenizer, DIALOGS["multi-turn"])
    assert [i for i, t in enumerate(ids) if t == 1] == [0, ids.index(2) + 1]
    assert ids.count(2) == 1 and ids[-1] != 2


def test_written_bos_is_not_bos_id(llama2_tokenizer):
    ids = chat_ids(llama2_tokenizer, DIALOGS["special-token spellings"])
    assert ids.count(llama2_tokenizer.bos_id) == 1 and ids[0] == llama2_tokenizer.bos_id
    assert llama2_tokenizer.eos_id not in ids
    raw = prompt_ids(llama2_tokenizer, "<s>[INST] hi [/INST]", raw=True, system_prompt=None)
    assert raw.count(llama2_tokenizer.bos_id) == 1


PROMPTS = ["Hello", "  leading", "trailing   ", "  multiple   inner   spaces  ", "\nnew\nlines\n", "日本語 🙂"]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("system", [None, DEFAULT_SYSTEM_PROMPT, "  odd system  "])
def test_prompt_ids_equal_meta_single_turn(llama2_tokenizer, llama2_sp, prompt, system):
    dialog = [{"role": "user", "content": prompt}]
    if system is not None:
        dialog.insert(0, {"role": "system", "content": system})
    assert prompt_ids(llama2_tokenizer, prompt, raw=False, system_prompt=system) == meta_chat_tokens(llama2_sp, dialog)


@pytest.mark.parametrize("prompt", PROMPTS + ["[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST]"])
def test_raw_prompt_is_bos_plus_text(llama2_tokenizer, llama2_sp, prompt):
    ids = prompt_ids(llama2_tokenizer, prompt, raw=True, system_prompt=DEFAULT_SYSTEM_PROMPT)
    assert ids == [1, *llama2_sp.encode(prompt)]


def test_default_system_prompt_text():
    assert DEFAULT_SYSTEM_PROMPT == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions."
    )


def _error(tokenizer, messages) -> str:
    with pytest.raises(InvalidRequest) as info:
        chat_ids(tokenizer, messages)
    return str(info.value)


def _msgs(*roles: str) -> list[dict]:
    return [{"role": r, "content": f"text {i}"} for i, r in enumerate(roles)]


@pytest.mark.parametrize(
    ("messages", "fragments"),
    [
        ([], ["messages", "empty"]),
        (_msgs("user", "robot"), ["messages[1].role", "unknown role 'robot'"]),
        (_msgs("user", "assistant", "system", "user"), ["messages[2].role", "only come first"]),
        (_msgs("user", "user"), ["messages[1].role", "two 'user' messages in a row", "messages[0]"]),
        (_msgs("system", "user", "assistant", "assistant", "user"), ["messages[3].role", "two 'assistant'"]),
        (_msgs("assistant", "user"), ["messages[0].role", "must start with 'user'"]),
        (_msgs("system", "assistant", "user"), ["messages[1].role", "must start with 'user'"]),
        (_msgs("user", "assistant"), ["messages[1].role", "last message must come from 'user'"]),
        (_msgs("system"), ["only a system message"]),
        ([{"role": "user"}], ["messages[0]", "'role' and 'content'"]),
        ([{"role": "user", "content": 5}], ["messages[0]", "must be strings"]),
    ],
)
def test_message_order_errors(llama2_tokenizer, messages, fragments):
    message = _error(llama2_tokenizer, messages)
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
def test_injection_tags_refused_in_messages(llama2_tokenizer, tag):
    messages = _msgs("system", "user", "assistant", "user")
    messages[2]["content"] = f"sure {tag} now"
    message = _error(llama2_tokenizer, messages)
    assert "messages[2].content" in message and repr(tag) in message and "raw=true" in message


def test_injection_tag_refused_in_system_message(llama2_tokenizer):
    message = _error(llama2_tokenizer, [{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "hi"}])
    assert "messages[0].content" in message


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
def test_injection_tags_refused_in_prompt_but_allowed_raw(llama2_tokenizer, tag):
    with pytest.raises(InvalidRequest, match=r"prompt: contains .*raw=true"):
        prompt_ids(llama2_tokenizer, f"a {tag} b", raw=False, system_prompt=None)
    assert prompt_ids(llama2_tokenizer, f"a {tag} b", raw=True, system_prompt=None)[0] == 1


def test_lowercase_lookalike_is_not_a_tag(llama2_tokenizer, llama2_sp):
    dialog = [{"role": "user", "content": "[inst] is fine, so is <<sys>>"}]
    assert chat_ids(llama2_tokenizer, dialog) == meta_chat_tokens(llama2_sp, dialog)
