"""Export stage 0 for `--model demo`: make the built-in tiny Llama-2-architecture checkpoint.

A real sentencepiece tokenizer (trained in about a second on the corpus shipped beside this file,
with Llama-2's special ids and byte fallback) and deterministic random weights, written as a Hugging
Face checkpoint folder so that everything downstream (export, verify, serve) runs as for Llama-2.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from llmpack.export.random_checkpoint import llama_config, write_random_checkpoint

DEMO_CORPUS = Path(__file__).with_name("demo_corpus.txt")
DEMO_VERSION = 2
DEMO_SEED = 20231
DEMO_SHAPE = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=4096,
)


def demo_cache_dir() -> Path:
    root = os.environ.get("LLMPACK_CACHE") or Path.home() / ".cache" / "llmpack"
    return Path(root) / f"demo-v{DEMO_VERSION}"


def train_demo_tokenizer(vocab_size: int = 512) -> bytes:
    """A sentencepiece BPE model configured like Llama-2's (ids, byte fallback, dummy prefix)."""
    import sentencepiece as spm

    corpus = DEMO_CORPUS.read_text(encoding="utf-8")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_demo_checkpoint(folder: Path) -> Path:
    """Write the demo checkpoint into folder; reuse it when already there."""
    import sentencepiece as spm

    if (Path(folder) / "config.json").is_file():
        return Path(folder)
    tokenizer = train_demo_tokenizer()
    vocab = spm.SentencePieceProcessor(model_proto=tokenizer).vocab_size()
    config = llama_config({**DEMO_SHAPE, "vocab_size": vocab})
    return write_random_checkpoint(folder, config, tokenizer, DEMO_SEED)
