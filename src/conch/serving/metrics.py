"""Prometheus metrics for the server (``GET /metrics``), through prometheus-client.

Each app has its own registry, so two servers in one process (tests, notebooks) do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine_stats):
        """``engine_stats``: a function returning the engine (read at scrape time), or None before startup."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("conch_requests", "Generations ended, by finish reason "
                                "(stop, length, cancelled, timeout, error, shutdown)", ["finish_reason"], registry=r)
        self.rejected = Counter("conch_rejected_requests", "Requests refused before generating, by HTTP status",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("conch_prompt_tokens", "Prompt tokens read", registry=r)
        self.generation_tokens = Counter("conch_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("conch_time_to_first_token_seconds", "From submit to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("conch_request_latency_seconds", "From submit to the last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        waiting = Gauge("conch_queue_depth", "Requests waiting for a place in the batch", registry=r)
        running = Gauge("conch_running_requests", "Requests in the batch", registry=r)
        waiting.set_function(lambda: engine_stats().queue_depth if engine_stats() else 0)
        running.set_function(lambda: engine_stats().active if engine_stats() else 0)

    def finished(self, outcome, submitted: float, first_token_at: float | None, ended: float) -> None:
        self.requests.labels(outcome.finish_reason).inc()
        self.prompt_tokens.inc(outcome.prompt_tokens)
        self.generation_tokens.inc(outcome.completion_tokens)
        if first_token_at is not None:
            self.ttft.observe(first_token_at - submitted)
        if outcome.ok:
            self.latency.observe(ended - submitted)

    def render(self) -> bytes:
        return generate_latest(self.registry)
