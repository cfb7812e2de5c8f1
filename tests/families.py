"""Test support: tiny random checkpoints of each Llama-family member, built with transformers' own classes.

Llama-3 and Qwen2 get a byte-level BPE tokenizer.json trained here with the `tokenizers` library and saved
through transformers' own `save_pretrained` with the family's special tokens and chat template; Mistral gets
the real Llama-2 sentencepiece vocabulary converted to tokenizer.json by transformers (Mistral v0.1/v0.2 use
the same kind of tokenizer), so it needs ../shared. The templates follow the published ones' structure:
Llama-3's header blocks with bos_token, Qwen2's ChatML with a default system turn, Mistral's [INST] turns with
raise_exception on a broken role order.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Once upon a time there was a little girl named Lily. She loved to play outside in the sunshine.",
    "The quick brown fox jumps over the lazy dog.   Spaces,\ttabs and\nnew lines\n\nmatter.",
    "def add(a, b):\n    return a + b  # code has indentation",
    "Emoji: 🙂👍🏽🚀 and CJK: 你好，世界。日本語のテキスト。한국어 문장.",
    "Numbers 12345 and 3.14159, URLs like https://example.com/path?q=1&r=2.",
    "Ünïcödé àccents, naïve café, straße, ½ ¾ — “quotes” and ‘apostrophes’.",
] * 20

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- if system_message %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN2_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


# Qwen2's published tokenizer.json splits with this regex after NFC; transformers 5's Qwen2Tokenizer rebuilds exactly
# that pipeline around the file's vocabulary (ignoring the file's own), so the test tokenizer must have it too.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def byte_level_tokenizer(special: list[str], bos: str | None, vocab_size: int = 400, qwen2: bool = False):
    """A byte-level BPE (Llama-3 / Qwen2 kind) trained on CORPUS; `bos` is added by its post-processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if qwen2:
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    if bos is None:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def save_fast_tokenizer(tokenizer, folder: Path, template: str, **special_tokens) -> object:
    """Save through transformers' own save_pretrained (tokenizer.json, tokenizer_config.json, the template)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)
    fast.chat_template = template
    fast.save_pretrained(str(folder))
    return fast


def save_model(config, folder: Path, eos_ids: list[int], seed: int = 0) -> None:
    """Random weights for `config` (transformers' own class for it), saved with its generation config."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases are zero at init: make them count, so a graph that drops them fails
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos_ids,
                                               pad_token_id=eos_ids[0])
    model.save_pretrained(str(folder))


def llama3_checkpoint(folder: Path) -> Path:
    """Llama-3.x: byte-level BPE, llama3 rope scaling over theta 500000, tied embeddings, an explicit head_dim,
    two stop ids."""
    from transformers import LlamaConfig

    tokenizer = byte_level_tokenizer(LLAMA3_SPECIAL, "<|begin_of_text|>")
    save_fast_tokenizer(tokenizer, folder, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    ids = {token: tokenizer.token_to_id(token) for token in LLAMA3_SPECIAL}
    config = LlamaConfig(**{**SIZES, "head_dim": 32}, vocab_size=tokenizer.get_vocab_size(), tie_word_embeddings=True,
                         rope_theta=500000.0, bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"],
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    save_model(config, folder, [ids["<|end_of_text|>"], ids["<|eot_id|>"]])
    return folder


def qwen2_checkpoint(folder: Path) -> Path:
    """Qwen2: q/k/v biases, ChatML, no BOS, tied embeddings."""
    from transformers import Qwen2Config

    tokenizer = byte_level_tokenizer(QWEN2_SPECIAL, None, qwen2=True)
    save_fast_tokenizer(tokenizer, folder, QWEN2_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {token: tokenizer.token_to_id(token) for token in QWEN2_SPECIAL}
    config = Qwen2Config(**SIZES, vocab_size=tokenizer.get_vocab_size() + 3, tie_word_embeddings=True,
                         rope_theta=1000000.0, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    save_model(config, folder, [ids["<|im_end|>"], ids["<|endoftext|>"]])
    return folder


def mistral_checkpoint(folder: Path, sentencepiece_model: Path, sliding_window: int = 4096) -> Path:
    """Mistral: the Llama layout with a sliding window and its own template; tokenizer.model and tokenizer.json
    (transformers' conversion of the sentencepiece model), as Mistral v0.1/v0.2 ship them."""
    import shutil

    from transformers import LlamaTokenizer, MistralConfig

    shutil.copyfile(sentencepiece_model, folder / "tokenizer.model")
    fast = LlamaTokenizer.from_pretrained(str(folder))  # transformers converts the sentencepiece model
    fast.chat_template = MISTRAL_TEMPLATE
    fast.save_pretrained(str(folder))
    config = MistralConfig(**SIZES, vocab_size=len(fast), sliding_window=sliding_window, bos_token_id=1,
                           eos_token_id=2, tie_word_embeddings=False)
    save_model(config, folder, [2])
    return folder
