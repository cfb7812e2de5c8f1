"""Request -> prompt token ids: the Llama-2-chat template, built exactly as Meta's `chat_completion`.

Reference: facebookresearch/llama, llama/generation.py (Llama 2). Ids are built per turn —
BOS + encode("[INST] … [/INST] … ") + EOS — never by encoding one big string, so "<s>" inside a
message stays text and each turn starts with a real BOS id like the model saw in fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llmpack.runtime.errors import InvalidRequest
from llmpack.runtime.tokenizer import Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")

# What Workers AI puts in front of a non-raw `prompt`; callers pass it or None to prompt_ids.
DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

ORDER_RULE = "roles must go user, assistant, user, … after an optional first system message"


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def as_message(item: Message | Mapping, index: int) -> Message:
    """Accept Message objects and {"role", "content"} mappings alike (Meta's dialogs are dicts)."""
    if isinstance(item, Message):
        message = item
    elif isinstance(item, Mapping) and "role" in item and "content" in item:
        message = Message(role=item["role"], content=item["content"])
    else:
        raise InvalidRequest(f"messages[{index}]: must be an object with 'role' and 'content'")
    if not isinstance(message.role, str) or not isinstance(message.content, str):
        raise InvalidRequest(f"messages[{index}]: 'role' and 'content' must be strings")
    return message


def check_no_tags(text: str, where: str) -> None:
    """Refuse the tags that delimit turns: in user text they would forge a turn boundary."""
    for tag in SPECIAL_TAGS:
        if tag in text:
            raise InvalidRequest(
                f"{where}: contains {tag!r}, which would inject into the Llama-2 turn structure; "
                "remove it, or send the whole text as a prompt with raw=true "
                "(raw prompts are passed to the model unchanged)"
            )


def check_messages(messages: Sequence[Message | Mapping]) -> tuple[Message, ...]:
    """Enforce the role order Meta asserts and the tag ban; return the messages as Message objects."""
    if len(messages) == 0:
        raise InvalidRequest("messages: is empty; send at least one message with role 'user'")
    checked = tuple(as_message(item, i) for i, item in enumerate(messages))
    offset = 1 if checked[0].role == "system" else 0
    for i, message in enumerate(checked):
        _check_role(checked, i, offset)
        check_no_tags(message.content, f"messages[{i}].content")
    last = len(checked) - 1
    if last < offset:
        raise InvalidRequest("messages: has only a system message; add a 'user' message after it")
    if checked[last].role != "user":
        raise InvalidRequest(
            f"messages[{last}].role: the last message must come from 'user', got "
            f"{checked[last].role!r}; the model answers the last user message"
        )
    return checked


def _check_role(messages: tuple[Message, ...], i: int, offset: int) -> None:
    role = messages[i].role
    if role not in ROLES:
        raise InvalidRequest(f"messages[{i}].role: unknown role {role!r}; use 'system', 'user' or 'assistant'")
    if role == "system" and i > 0:
        raise InvalidRequest(f"messages[{i}].role: a system message may only come first; {ORDER_RULE}")
    expected = "user" if (i - offset) % 2 == 0 else "assistant"
    if role == expected or i < offset:
        return
    if i > offset:
        raise InvalidRequest(
            f"messages[{i}].role: two {role!r} messages in a row (messages[{i - 1}] and "
            f"messages[{i}]); {ORDER_RULE}"
        )
    raise InvalidRequest(f"messages[{i}].role: the conversation must start with 'user', got {role!r}; {ORDER_RULE}")


def chat_ids(tokenizer: Tokenizer, messages: Sequence[Message | Mapping]) -> list[int]:
    """Prompt ids for a `messages` request; no default system prompt is added."""
    return checked_chat_ids(tokenizer, check_messages(messages))


def checked_chat_ids(tokenizer: Tokenizer, checked: tuple[Message, ...]) -> list[int]:
    """chat_ids for messages check_messages already passed (a parsed request's): checked once, not twice."""
    system = checked[0].content if checked[0].role == "system" else None
    turns = [m.content for m in checked[1 if system is not None else 0 :]]
    return _dialog_ids(tokenizer, system, turns)


def prompt_ids(tokenizer: Tokenizer, prompt: str, raw: bool, system_prompt: str | None,
               checked: bool = False) -> list[int]:
    """Prompt ids for a `prompt` request: raw text after BOS, or one user turn in the template.

    `checked`: the prompt already passed check_no_tags (a parsed request's).
    """
    if raw:
        return [tokenizer.bos_id, *tokenizer.encode(prompt)]
    if not checked:
        check_no_tags(prompt, "prompt")
    return _dialog_ids(tokenizer, system_prompt, [prompt])


def _dialog_ids(tokenizer: Tokenizer, system: str | None, turns: list[str]) -> list[int]:
    """turns: user, assistant, …, user contents. Mirrors Meta's construction line for line."""
    if system is not None:
        # Meta merges the system text into the first user turn, then strips the merged text.
        turns = [B_SYS + system + E_SYS + turns[0], *turns[1:]]
    ids: list[int] = []
    for user, answer in zip(turns[::2], turns[1::2]):
        text = f"{B_INST} {user.strip()} {E_INST} {answer.strip()} "
        ids += [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    ids += [tokenizer.bos_id, *tokenizer.encode(f"{B_INST} {turns[-1].strip()} {E_INST}")]
    return ids
