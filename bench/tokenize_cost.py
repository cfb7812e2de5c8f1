"""Measurement: is a prompt cheaper to tokenize on the event loop than to hand to a worker thread?

The server tokenizes requests with at most runtime/serve/server.py's INLINE_TOKENIZE_CHARS of text in place
and longer ones in Starlette's thread pool. This times `Tokenizer.encode` by text length (median of 200
calls) and the thread-pool hop itself (`run_in_threadpool` of a no-op from a running loop, median of 200),
on the artifact's own tokenizer. Writes bench/results/tokenize-cost-<date>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import header, write_results  # noqa: E402

TEXT = "Once upon a time there was a little girl who loved to play in the park with her friends. " * 60


def encode_ms(tokenizer, text: str, calls: int = 200) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        tokenizer.encode(text)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


async def hop_ms(calls: int = 200) -> float:
    from starlette.concurrency import run_in_threadpool

    times = []
    for _ in range(calls):
        start = time.perf_counter()
        await run_in_threadpool(lambda: None)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="an artifact, or any folder with a tokenizer.model")
    args = parser.parse_args()
    from llmpack.runtime.serve.server import INLINE_TOKENIZE_CHARS
    from llmpack.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(args.artifact / "tokenizer.model")
    rows = [(chars, encode_ms(tokenizer, TEXT[:chars])) for chars in (200, INLINE_TOKENIZE_CHARS, 4096)]
    hop = asyncio.run(hop_ms())
    lines = [header("Tokenizing in place vs a thread-pool hop", "sentencepiece", "starlette"),
             f"artifact `{args.artifact.name}`; INLINE_TOKENIZE_CHARS = {INLINE_TOKENIZE_CHARS}", "",
             "| what | ms (median) |", "|---|---|",
             *(f"| encode {chars} chars | {ms:.3f} |" for chars, ms in rows),
             f"| run_in_threadpool hop (no-op) | {hop:.3f} |"]
    write_results("tokenize-cost", lines)


if __name__ == "__main__":
    main()
