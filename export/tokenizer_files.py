"""Export stage 1: which tokenizer and chat template a checkpoint brings, and what the artifact keeps of them.

Llama-2 is served Meta-exact: its sentencepiece `tokenizer.model` and the Llama-2-chat construction in ids
(runtime/template.py). Every other model is served as Hugging Face serves it: `tokenizer.json` read by the
`tokenizers` library and the checkpoint's own Jinja chat template (`chat_template.jinja`, or `chat_template`
in tokenizer_config.json) rendered with its special tokens. The rule, in order:
1. tokenizer.model present and no chat template, or the template is Llama-2-chat's → sentencepiece + Meta's
   construction (Llama-2, CodeLlama and base Llama-2-style checkpoints, as before);
2. tokenizer.json present → tokenizers + the checkpoint's template (none: raw prompts only, a base model);
3. otherwise refused, naming the file that is missing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from llmpack.runtime import manifest as names
from llmpack.runtime.errors import CheckpointError

log = logging.getLogger("llmpack.export")

TOKENIZER_CONFIG = "tokenizer_config.json"
LLAMA2_MARKERS = ("<<SYS>>", "[INST]")  # what every Llama-2-chat template (Meta's, HF's copies) contains
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class TokenizerChoice:
    """What the artifact gets: the tokenizer kind and file, the chat template kind and text, the token names."""

    tokenizer: str  # names.SENTENCEPIECE | names.HF_TOKENIZERS
    source_file: str  # in the checkpoint folder
    chat_template: str  # names.LLAMA2_CHAT | names.JINJA_CHAT | names.NO_CHAT
    template_text: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    template_source: str | None = None  # the checkpoint file the template came from


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-download the checkpoint") from exc
    return data if isinstance(data, dict) else {}


def chat_template_text(folder: Path) -> tuple[str | None, str | None]:
    """(template, the file it came from): chat_template.jinja first, as transformers reads it, then the config."""
    jinja = folder / names.CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), names.CHAT_TEMPLATE_FILE
    template = _json(folder / TOKENIZER_CONFIG).get("chat_template")
    if isinstance(template, list):  # named templates: the default one is the chat template
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return (template, TOKENIZER_CONFIG) if isinstance(template, str) and template.strip() else (None, None)


def special_tokens(folder: Path) -> dict[str, str]:
    """bos_token, eos_token, … as apply_chat_template passes them to the template: transformers' own
    special_tokens_map (its tokenizer classes add defaults the config does not name, e.g. Qwen2's unk_token)."""
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        return dict(AutoTokenizer.from_pretrained(str(folder)).special_tokens_map)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a tokenizer it cannot load
        log.warning("transformers could not load the tokenizer of %s (%s); special tokens taken from %s",
                    folder, exc, TOKENIZER_CONFIG)
    config, out = _json(folder / TOKENIZER_CONFIG), {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[name] = value
    return out


def choose_tokenizer(folder: Path) -> TokenizerChoice:
    template, source = chat_template_text(folder)
    has_sentencepiece = (folder / names.TOKENIZER_FILE).is_file()
    is_llama2_chat = template is None or all(marker in template for marker in LLAMA2_MARKERS)
    if has_sentencepiece and is_llama2_chat:
        return TokenizerChoice(names.SENTENCEPIECE, names.TOKENIZER_FILE, names.LLAMA2_CHAT)
    if (folder / names.HF_TOKENIZER_FILE).is_file():
        return TokenizerChoice(names.HF_TOKENIZERS, names.HF_TOKENIZER_FILE,
                               names.JINJA_CHAT if template else names.NO_CHAT, template, special_tokens(folder),
                               source)
    if has_sentencepiece:
        raise CheckpointError(
            f"{folder}: its chat template ({source}) is not Llama-2-chat's and needs the special tokens of "
            f"{names.HF_TOKENIZER_FILE}, which the folder lacks; copy the checkpoint's {names.HF_TOKENIZER_FILE}")
    raise CheckpointError(
        f"{folder} has no tokenizer: llmpack needs {names.TOKENIZER_FILE} (sentencepiece, Llama-2) or "
        f"{names.HF_TOKENIZER_FILE} (Llama-3, Mistral, Qwen2, …); copy the checkpoint's tokenizer files into it")
