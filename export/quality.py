"""Export stage 4 for `--quant` artifacts: how far int8/int4 weights move the model's predictions.

A quantized artifact cannot match fp32 logits to 1e-4, so `llm-export verify` measures what matters
instead, teacher-forced over a fixed English text: at every position, does the artifact's most likely
next token equal the fp32 PyTorch model's (top-1 agreement), and how far apart are the two next-token
distributions (mean KL(P_fp32 || P_artifact), in nats).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# A TinyStories-like paragraph: real English that stories260k was trained on, short enough to run fast.
QUALITY_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she saw a big red ball under a tree. She ran to the ball and picked it up. \"This is "
    "my new ball,\" she said. Her friend Tom came over and said, \"Can I play with it too?\" Lily thought "
    "for a moment and then smiled. \"Yes, we can play together!\" They threw the ball to each other all "
    "day long. When the sun went down, Lily and Tom were very tired but very happy. They went home and "
    "told their moms about the fun day they had. The next day, they met again at the park to play."
)
MAX_TOKENS = 160

# Top-1 agreement is gated where the fp32 model has a clear favourite (its top-1 probability leads the
# runner-up by DECIDED_MARGIN): at a near-tie either answer is as good, and a random-weight model like
# the demo is near ties almost everywhere (mean top-1 probability 0.13 vs 0.73 for stories260k).
DECIDED_MARGIN = 0.1
# Pass/fail bounds, from the measurements in README "Quantization quality" (stories260k and the demo):
# below what block 32 at accuracy level 4 reaches on both, far above what a broken packing gives
# (agreement near chance, KL of several nats).
THRESHOLDS = {"int8": (0.97, 0.01), "int4": (0.85, 0.15)}  # (min decided top-1 agreement, max mean KL)


@dataclass(frozen=True)
class Quality:
    tokens: int
    top1_agreement: float  # over every position
    decided: int  # positions where fp32 has a clear favourite
    decided_agreement: float  # top-1 agreement over those
    mean_kl: float


def quality_ids(artifact, limit: int) -> list[int]:
    """The quality text's ids after BOS (when the model has one), in the artifact's own tokenizer."""
    from llmpack.runtime.chat_format import load_tokenizer

    bos = artifact.manifest.bos_token_id
    ids = load_tokenizer(artifact).encode(QUALITY_TEXT)
    return ([] if bos is None else [bos]) + ids[: limit - (bos is not None)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(reference: np.ndarray, candidate: np.ndarray) -> Quality:
    """Agreement and mean KL(reference || candidate) over rows of logits [positions, vocab]."""
    ref, cand = log_softmax(reference), log_softmax(candidate)
    kl = (np.exp(ref) * (ref - cand)).sum(axis=-1)
    agree = reference.argmax(axis=-1) == candidate.argmax(axis=-1)
    top2 = np.sort(np.exp(ref), axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] >= DECIDED_MARGIN
    decided_agreement = float(agree[decided].mean()) if decided.any() else 1.0
    return Quality(len(agree), float(agree.mean()), int(decided.sum()), decided_agreement, float(kl.mean()))


def artifact_logits(backend, ids: list[int]) -> np.ndarray:
    """Teacher-forced next-token logits of every position, fed one token at a time through the cache."""
    rows = [backend.prefill(0, [token]).copy() for token in ids]
    backend.reset(0)
    return np.stack(rows)


def reference_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def measure(model, backend, artifact) -> Quality:
    ids = quality_ids(artifact, min(MAX_TOKENS, artifact.manifest.max_context))
    return compare(reference_logits(model, ids), artifact_logits(backend, ids))


def judge(method: str, q: Quality) -> list[tuple[str, str, str, bool]]:
    """verify's rows (name, value, limit, ok) for a quantized artifact."""
    min_top1, max_kl = THRESHOLDS[method]
    return [
        (f"top-1 agreement with fp32 where it leads by {DECIDED_MARGIN}",
         f"{q.decided_agreement:.3f} of {q.decided} (all {q.tokens}: {q.top1_agreement:.3f})", f">= {min_top1}",
         q.decided_agreement >= min_top1),
        ("mean KL(fp32 || artifact), nats", f"{q.mean_kl:.2e}", f"<= {max_kl}", q.mean_kl <= max_kl),
    ]
