"""Serving stage 0 (observability): counters, gauges and histograms rendered as Prometheus text by hand.

Written out here rather than pulled in as a dependency: the exposition format is a few lines, and the
server needs only counters with labels, histograms and gauges read at scrape time. Every method is
thread-safe: the worker thread records token timings while the event loop records HTTP statuses.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

# Seconds. TTFT includes the wait in the queue, so its buckets reach far further than the per-token ones.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {running}')
        return [*out, f"{name}_sum {_number(self.sum)}", f"{name}_count {running}"]


class Metrics:
    """The server's metrics; gauges are read from callables so they can never drift from the truth."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}
        self.generations: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], float], str]] = {}

    def request_done(self, route: str, status: int) -> None:
        with self._lock:
            key = (route, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def generation_done(self, outcome: str, prompt_tokens: int, generated_tokens: int) -> None:
        with self._lock:
            self.generations[outcome] = self.generations.get(outcome, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += generated_tokens

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def next_tokens(self, seconds: float, tokens: int) -> None:
        """`tokens` arrived together after `seconds` (a piece can hold several): each took an equal share."""
        with self._lock:
            self.itl.observe(seconds / tokens, tokens)

    def gauge(self, name: str, help_text: str, read: Callable[[], float], kind: str = "gauge") -> None:
        """A value read when rendered; kind "counter" for a total kept elsewhere (name it *_total)."""
        self.gauges[name] = (help_text, read, kind)

    def render(self) -> str:
        with self._lock:
            lines = _family("llmpack_http_requests_total", "counter", "HTTP requests by route and status.")
            lines += [f'llmpack_http_requests_total{{route="{_label(r)}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self.requests.items())]
            lines += _family("llmpack_generations_total", "counter", "Generations by outcome.")
            lines += [f'llmpack_generations_total{{outcome="{o}"}} {n}' for o, n in sorted(self.generations.items())]
            lines += _family("llmpack_prompt_tokens_total", "counter", "Prompt tokens fed to the model.")
            lines.append(f"llmpack_prompt_tokens_total {self.prompt_tokens}")
            lines += _family("llmpack_generated_tokens_total", "counter", "Tokens generated.")
            lines.append(f"llmpack_generated_tokens_total {self.generated_tokens}")
            lines += _family("llmpack_time_to_first_token_seconds", "histogram",
                             "From admission (queue wait included) to the first text piece.")
            lines += self.ttft.lines("llmpack_time_to_first_token_seconds")
            lines += _family("llmpack_inter_token_latency_seconds", "histogram",
                             "Time per generated token after the first.")
            lines += self.itl.lines("llmpack_inter_token_latency_seconds")
        for name, (help_text, read, kind) in self.gauges.items():
            lines += [*_family(name, kind, help_text), f"{name} {_number(read())}"]
        return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))
