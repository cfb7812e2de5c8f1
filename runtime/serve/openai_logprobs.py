"""Serve wing (OpenAI side): log probabilities in OpenAI's two shapes, from the engine's TokenLogprobs.

The values are the engine's (sampling.token_logprobs): the log-softmax of the logits after penalties and
logit_bias, divided by the temperature (1 when greedy) — the distribution each token is drawn from before
top-k / top-p narrow it. A token is shown as the bytes it adds to the text, decoded as UTF-8 (a byte of a
longer character shows as U+FFFD; `bytes` has the truth).

- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`
- completions (legacy): `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`
"""

from __future__ import annotations

from collections.abc import Sequence

from llmpack.runtime.sampling import TOP_LOGPROBS_MAX, TokenLogprobs

COMPLETION_LOGPROBS_MAX = 5  # the legacy route's own bound


def requested_top(body: dict, chat: bool) -> int | None:
    """How many alternatives per token the body asks for; None when it asks for no log probabilities."""
    if not chat:
        top = body.get("logprobs")  # an integer 0..5 (the schema checked it; JSON may write it 5.0), or None
        return None if top is None else int(top)
    if not body.get("logprobs"):
        return None  # top_logprobs > 0 without logprobs was refused when the body was checked
    return int(body.get("top_logprobs") or 0)


class LogprobsFormat:
    """Turns TokenLogprobs into one route's shape; `offset` runs on across a stream's chunks (completions)."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer = tokenizer
        self.chat = chat
        self.offset = 0

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        data = self.tokenizer.piece_bytes(token_id)
        return data.decode("utf-8", errors="replace"), list(data)

    def _entry(self, token_id: int, logprob: float) -> dict:
        text, data = self._token(token_id)
        return {"token": text, "logprob": logprob, "bytes": data}

    def render(self, logprobs: Sequence[TokenLogprobs]) -> dict:
        if self.chat:
            return {"content": [{**self._entry(lp.token, lp.logprob),
                                 "top_logprobs": [self._entry(i, v) for i, v in lp.top]} for lp in logprobs]}
        tokens, offsets = [], []
        for lp in logprobs:
            text = self._token(lp.token)[0]
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{self._token(i)[0]: v for i, v in lp.top} for lp in logprobs],
                "text_offset": offsets}


# top_logprobs > 0 asks for alternatives of log probabilities the body must ask for (OpenAI refuses it too).
CHAT_RULE = {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
             "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}
CHAT_SCHEMA = {
    "logprobs": {"type": ["boolean", "null"]},
    "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": TOP_LOGPROBS_MAX},
}
COMPLETION_SCHEMA = {
    "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": COMPLETION_LOGPROBS_MAX},
}
