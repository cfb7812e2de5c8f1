"""Serving stage 0 (observability): the server's Prometheus metrics, on prometheus_client.

One registry per server (tests run several in one process). Request counters and latency histograms
(end to end, time to first token, inter-token, queue wait), the decode batch size, values read at scrape
time (queue depth, in-flight requests, the prefix cache's totals) and the process collector's CPU,
memory and file descriptors. Every method is thread-safe (prometheus_client locks each metric): the
batch thread records steps and queue waits while the event loop records HTTP requests and tokens.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE  # noqa: F401 - the route's type

# The `*_created` timestamp series prometheus_client adds beside every counter and histogram double the
# page for nothing a dashboard reads.
disable_created_metrics()

# Seconds. TTFT includes the wait in the queue, so its buckets reach far further than the per-token ones.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


class Metrics:
    """The server's metrics; values kept elsewhere are read at scrape time so they never drift from the truth."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        self.requests = Counter("llmpack_http_requests", "HTTP requests by route and status.",
                                ["route", "status"], registry=registry)
        self.request_seconds = Histogram("llmpack_http_request_duration_seconds",
                                         "HTTP request time by route, a whole stream included.", ["route"],
                                         buckets=REQUEST_BUCKETS, registry=registry)
        self.generations = Counter("llmpack_generations", "Generations by outcome.", ["outcome"], registry=registry)
        self.prompt_tokens = Counter("llmpack_prompt_tokens", "Prompt tokens fed to the model.", registry=registry)
        self.generated_tokens = Counter("llmpack_generated_tokens", "Tokens generated.", registry=registry)
        self.ttft = Histogram("llmpack_time_to_first_token_seconds",
                              "From admission (queue wait included) to the first text piece.",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("llmpack_inter_token_latency_seconds", "Time per generated token after the first.",
                             buckets=ITL_BUCKETS, registry=registry)
        self.queue_wait = Histogram("llmpack_queue_wait_seconds", "From admission to a batch slot.",
                                    buckets=QUEUE_BUCKETS, registry=registry)
        self.batch_size = Histogram("llmpack_decode_batch_size", "Sequences decoded together, per step.",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self._read_at_scrape = _ReadAtScrape()
        registry.register(self._read_at_scrape)

    def request_done(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def generation_done(self, outcome: str, prompt_tokens: int, generated_tokens: int) -> None:
        self.generations.labels(outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(generated_tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_tokens(self, seconds: float, tokens: int) -> None:
        """`tokens` arrived together after `seconds` (a piece can hold several): each took an equal share."""
        for _ in range(tokens):
            self.itl.observe(seconds / tokens)

    def queued(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def decode_step(self, rows: int) -> None:
        self.batch_size.observe(rows)

    def gauge(self, name: str, help_text: str, read: Callable[[], float], kind: str = "gauge") -> None:
        """A value read when scraped; kind "counter" for a total kept elsewhere (name it *_total)."""
        self._read_at_scrape.add(name, help_text, read, kind)

    def render(self) -> str:
        return generate_latest(self.registry).decode("utf-8")


class _ReadAtScrape:
    """A custom collector: families whose one value is read from a callable at each scrape."""

    def __init__(self):
        self.families: dict[str, tuple[str, Callable[[], float], str]] = {}

    def add(self, name: str, help_text: str, read: Callable[[], float], kind: str) -> None:
        self.families[name] = (help_text, read, kind)

    def collect(self):
        for name, (help_text, read, kind) in list(self.families.items()):
            if kind == "counter":
                yield CounterMetricFamily(name.removesuffix("_total"), help_text, value=read())
            else:
                yield GaugeMetricFamily(name, help_text, value=read())
