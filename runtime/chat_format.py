"""Engine core: an artifact's text side — its tokenizer, and its chat format (request -> prompt ids).

Three formats, chosen by the manifest: Llama-2-chat (runtime/template.py, Meta-exact in ids), the
checkpoint's own Jinja template rendered as transformers 5.23's apply_chat_template renders it
(transformers/utils/chat_template_utils.py: the same sandboxed environment, globals and variables,
then the text encoded without post-processor tokens), and none (a base model: raw prompts only).
Each format holds its own rules for messages, so a Llama-3 artifact is not held to Llama-2's.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmpack.runtime import manifest as names
from llmpack.runtime import template
from llmpack.runtime.artifact import Artifact
from llmpack.runtime.errors import ArtifactError, InvalidRequest
from llmpack.runtime.hf_tokenizer import HfTokenizer
from llmpack.runtime.request import GenerationRequest
from llmpack.runtime.template import ROLES, Message, as_message
from llmpack.runtime.tokenizer import TextTokenizer, Tokenizer

RAW_HINT = "send the prompt with raw=true"


class ChatFormat(Protocol):
    tokenizer: TextTokenizer  # the artifact's, which the format encodes with

    def check(self, messages: Sequence[Message | Mapping]) -> tuple[Message, ...]:
        """The messages as Message objects if this format can take them; InvalidRequest naming the problem."""

    def chat_ids(self, checked: tuple[Message, ...]) -> list[int]:
        """Prompt ids for messages `check` passed; no default system prompt is added."""

    def check_prompt(self, prompt: str, raw: bool) -> None:
        """InvalidRequest if this format cannot take the `prompt` request (prompt_ids checks it too)."""

    def prompt_ids(self, prompt: str, raw: bool, system_prompt: str | None) -> list[int]:
        """Prompt ids for a `prompt` request: raw text, or one user turn after `system_prompt` (if any)."""


class Llama2Chat:
    """Meta's Llama-2-chat construction: template.py, unchanged."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    def check(self, messages: Sequence[Message | Mapping]) -> tuple[Message, ...]:
        return template.check_messages(messages)

    def chat_ids(self, checked: tuple[Message, ...]) -> list[int]:
        return template.checked_chat_ids(self.tokenizer, checked)

    def check_prompt(self, prompt: str, raw: bool) -> None:
        if not raw:
            template.check_no_tags(prompt, "prompt")

    def prompt_ids(self, prompt: str, raw: bool, system_prompt: str | None) -> list[int]:
        return template.prompt_ids(self.tokenizer, prompt, raw, system_prompt)


class NoChat:
    """A base model without a chat template: raw prompts only."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    def check(self, messages: Sequence[Message | Mapping]) -> tuple[Message, ...]:
        raise InvalidRequest(f"messages: this model has no chat template (a base model); {RAW_HINT}")

    def chat_ids(self, checked: tuple[Message, ...]) -> list[int]:
        self.check(checked)  # always refuses: there is no template to build the turns with
        return []

    def check_prompt(self, prompt: str, raw: bool) -> None:
        if not raw:
            raise InvalidRequest(f"raw: this model has no chat template (a base model); {RAW_HINT}")

    def prompt_ids(self, prompt: str, raw: bool, system_prompt: str | None) -> list[int]:
        self.check_prompt(prompt, raw)
        return self.tokenizer.raw_prompt_ids(prompt)


class JinjaChat:
    """The checkpoint's chat template, with the checkpoint's special tokens as its variables."""

    def __init__(self, tokenizer: HfTokenizer, source: str, special_tokens: Mapping[str, object]):
        self.tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        # One pass over the text names the first special token in it (longest first, as HF matches them).
        texts = tokenizer.special_texts
        self._special_re = re.compile("|".join(map(re.escape, texts))) if texts else None
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise ArtifactError(f"the artifact's {names.CHAT_TEMPLATE_FILE} does not compile ({exc}); "
                                "rebuild the artifact") from exc

    def check(self, messages: Sequence[Message | Mapping]) -> tuple[Message, ...]:
        if len(messages) == 0:
            raise InvalidRequest("messages: is empty; send at least one message with role 'user'")
        checked = tuple(as_message(item, i) for i, item in enumerate(messages))
        for i, message in enumerate(checked):
            if message.role not in ROLES:
                raise InvalidRequest(
                    f"messages[{i}].role: unknown role {message.role!r}; use 'system', 'user' or 'assistant'")
            self._check_no_special_text(message.content, f"messages[{i}].content")
        return checked

    def chat_ids(self, checked: tuple[Message, ...]) -> list[int]:
        return self.tokenizer.encode(self.render(checked))

    def check_prompt(self, prompt: str, raw: bool) -> None:
        if not raw:
            self._check_no_special_text(prompt, "prompt")

    def prompt_ids(self, prompt: str, raw: bool, system_prompt: str | None) -> list[int]:
        if raw:
            return self.tokenizer.raw_prompt_ids(prompt)
        self.check_prompt(prompt, raw)
        system = (Message("system", system_prompt),) if system_prompt else ()
        return self.chat_ids((*system, Message("user", prompt)))

    def render(self, checked: tuple[Message, ...]) -> str:
        """The template's text for these messages, with the generation prompt, as apply_chat_template renders it."""
        chat = [{"role": m.role, "content": m.content} for m in checked]
        try:
            # transformers passes the same names: messages, tools, documents, add_generation_prompt, then
            # its special_tokens_map (which the manifest recorded) as further variables.
            return self._template.render(messages=chat, tools=None, documents=None, add_generation_prompt=True,
                                         **self.special_tokens)
        except jinja2.TemplateError as exc:  # raise_exception(...) in the template, or a template fault
            raise InvalidRequest(f"messages: the model's chat template refused them: {exc}") from exc

    def _check_no_special_text(self, text: str, where: str) -> None:
        # transformers' apply_chat_template leaves such text in place by default, and its tokenizer then parses
        # it into the token itself, so a user could forge a turn; its sanitize_control_tokens=True
        # (_mark_chat_inputs) instead encodes the text as plain text. Neither is visible to the client: we
        # refuse it, as the Llama-2 path refuses its turn tags, so ids never differ silently from HF's.
        found = self._special_re.search(text) if self._special_re is not None else None
        if found:
            raise InvalidRequest(
                f"{where}: contains {found.group()!r}, a special token of this model's tokenizer, which would inject "
                "into the chat template's turn structure; remove it, or send the whole text as a prompt with "
                "raw=true (raw prompts are passed to the model unchanged)")


def check_request(chat: ChatFormat, request: GenerationRequest) -> GenerationRequest:
    """The request if `chat` can take it, its messages checked; for callers that refuse before loading a model."""
    if request.messages is not None:
        return dataclasses.replace(request, messages=chat.check(request.messages))
    chat.check_prompt(request.prompt, request.raw)
    return request


def load_tokenizer(artifact: Artifact) -> TextTokenizer:
    """The tokenizer the manifest names: sentencepiece (Llama-2, Meta-exact) or tokenizer.json."""
    manifest = artifact.manifest
    if manifest.tokenizer == names.HF_TOKENIZERS:
        special = manifest.special_tokens
        return HfTokenizer.from_file(artifact.tokenizer_path, special.get("bos_token"), special.get("eos_token"))
    return Tokenizer.from_file(artifact.tokenizer_path)


def load_chat_format(artifact: Artifact, tokenizer: TextTokenizer) -> ChatFormat:
    kind = artifact.manifest.chat_template
    if kind == names.LLAMA2_CHAT:
        return Llama2Chat(tokenizer)
    if kind == names.NO_CHAT:
        return NoChat(tokenizer)
    if not isinstance(tokenizer, HfTokenizer):
        raise ArtifactError(f"the artifact's manifest pairs a Jinja chat template with a {artifact.manifest.tokenizer} "
                            f"tokenizer; its special tokens need {names.HF_TOKENIZER_FILE}: rebuild the artifact")
    try:
        source = artifact.chat_template_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ArtifactError(f"cannot read the artifact's {names.CHAT_TEMPLATE_FILE} ({exc}); rebuild the artifact") \
            from exc
    return JinjaChat(tokenizer, source, artifact.manifest.special_tokens)


class _GenerationTag(jinja2.ext.Extension):
    """transformers' {% generation %} block (it marks assistant text for training masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _TemplateDict:
    """transformers' `dict` global: a constructor without attribute access to break out with."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """transformers' `namespace` global: no underscore attributes (a way to CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store {name!r} on a namespace")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: Jinja's own escapes HTML characters, which would change the rendered text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    """The environment of transformers' _cached_compile_jinja_template: chat templates are untrusted code."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env
