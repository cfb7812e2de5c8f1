"""Benchmark: time to first token along a chat, with and without the prefix cache.

Each turn of a chat resends the whole conversation (template, system prompt, every earlier question
and answer), so without a prefix cache the prompt a turn computes grows with the chat. One engine in
process per setting, the same conversation (fixed questions, the model's own greedy answers appended,
as a client does), the settings alternating over the rounds; the median TTFT per turn. Writes
bench/results/chat-turns-<date>.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from llmpack.runtime.engine import Engine, EngineOptions
from llmpack.runtime.serve.protocol import parse_request
from llmpack.runtime.template import DEFAULT_SYSTEM_PROMPT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header, write_results  # noqa: E402

QUESTIONS = ["Tell me a story about a brave little boat.", "What happened to the boat next?",
             "Who helped the boat when the storm came?", "How did the story end?",
             "Tell me another one, about a lighthouse.", "Why was the lighthouse sad?"]


def one_chat(engine: Engine, answer_tokens: int) -> list[tuple[int, float]]:
    """(prompt tokens, TTFT seconds) per turn of one conversation."""
    messages, turns = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}], []
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        request = parse_request({"messages": messages, "max_tokens": answer_tokens, "temperature": 0})
        started = time.perf_counter()
        stream = engine.stream_request(request)
        pieces = iter(stream)
        first = next(pieces, "")
        ttft = time.perf_counter() - started
        answer = first + "".join(pieces)
        turns.append((stream.usage.prompt_tokens, ttft))
        messages.append({"role": "assistant", "content": answer})
    return turns


def settle(engine: Engine) -> None:
    """Wait until the batch thread has released the last sequence: a stream ends before its sequence
    is released, and the release keeps the finished sequence in the prefix cache."""
    while engine.scheduler.active:
        time.sleep(0.001)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    settings = {"prefix cache on": 256, "prefix cache off": 0}
    engines = {name: Engine.load(args.artifact, EngineOptions(threads=args.threads, max_batch=1, verify_checksums=False,
                                                               prefix_cache_mb=mb)) for name, mb in settings.items()}
    runs: dict[str, list[list[tuple[int, float]]]] = {name: [] for name in settings}
    for name, engine in engines.items():
        one_chat(engine, 4)  # warm-up: sessions, bindings; the cache is cleared below
    for _ in range(args.rounds):
        for name, engine in engines.items():
            if engine.prefix_cache is not None:
                settle(engine)
                engine.prefix_cache.clear()  # every round starts a new chat with the cache warm from nothing
            runs[name].append(one_chat(engine, args.answer_tokens))
    for engine in engines.values():
        engine.close()
    lines = [header("Time to first token along a chat, prefix cache on and off", "onnxruntime", "numpy"),
             f"artifact `{args.artifact.name}`, {len(QUESTIONS)} turns, greedy answers of up to {args.answer_tokens} "
             f"tokens appended to the conversation, chat template with Workers AI's default system prompt as the system "
             f"message, {args.rounds} rounds, "
             f"--threads {args.threads}; median TTFT in ms", "",
             "| turn | prompt tokens | cache on | cache off | off / on |", "|---|---|---|---|---|"]
    for turn in range(len(QUESTIONS)):
        on, off = ([run[turn][1] for run in runs[name]] for name in settings)
        tokens = runs["prefix cache on"][0][turn][0]
        lines.append(f"| {turn + 1} | {tokens} | {1000 * statistics.median(on):.0f} | "
                     f"{1000 * statistics.median(off):.0f} | {statistics.median(off) / statistics.median(on):.1f}× |")
    write_results("chat-turns", lines)


if __name__ == "__main__":
    main()
