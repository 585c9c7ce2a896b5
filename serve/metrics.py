"""Prometheus metrics: request counts and latencies seen by the front ends, load read from the engine."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)

# (metric name, EngineStats field, help, counter?)
ENGINE_FIELDS = [
    ("hyla_num_requests_running", "num_running", "Requests the engine is running.", False),
    ("hyla_num_requests_waiting", "num_waiting", "Requests queued for the engine.", False),
    ("hyla_kv_blocks_used", "kv_blocks_used", "KV-cache blocks running requests hold.", False),
    ("hyla_kv_blocks_total", "kv_blocks_total", "KV-cache blocks allocated.", False),
    ("hyla_state_slots_used", "state_slots_used", "Linear-attention state slots running requests hold.", False),
    ("hyla_state_slots_total", "state_slots_total", "Linear-attention state slots allocated.", False),
    ("hyla_num_preemptions", "num_preemptions", "Requests preempted for cache space.", True),
    ("hyla_prompt_tokens", "prompt_tokens_total", "Prompt tokens processed.", True),
    ("hyla_generation_tokens", "generation_tokens_total", "Tokens generated.", True),
    ("hyla_prefix_cache_queries", "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.", True),
    ("hyla_prefix_cache_hits", "prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", True),
    ("hyla_prefix_cache_blocks", "prefix_cache_blocks", "KV blocks only the prefix cache holds (evictable).", False),
    ("hyla_prefix_cache_snapshots", "prefix_cache_snapshots", "Linear-state snapshots the prefix cache holds.", False),
]


class EngineStatsCollector(Collector):
    """The engine's stats as of the scrape being rendered, so gauges are never stale."""

    def __init__(self) -> None:
        self.stats: Any = None

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        if stats is None:
            return
        for name, field, help_text, counter in ENGINE_FIELDS:
            family = CounterMetricFamily if counter else GaugeMetricFamily
            yield family(name, help_text, value=getattr(stats, field))


class ServerMetrics:
    """One registry per server (several servers can live in one process, e.g. in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hyla_requests", "Requests answered, by front end, endpoint and status.",
            ["protocol", "endpoint", "status"], registry=self.registry,
        )
        self.failed = Counter(
            "hyla_request_failures", "Requests the engine failed (streams included, whatever status they began with).",
            ["error"], registry=self.registry,
        )
        self.finished = Counter(
            "hyla_request_finished", "Finished continuations by finish reason.", ["reason"], registry=self.registry
        )
        self.ttft = Histogram(
            "hyla_time_to_first_token_seconds", "Arrival to first generated token.",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.tpot = Histogram(
            "hyla_time_per_output_token_seconds", "Mean time between generated tokens of a request.",
            buckets=PER_TOKEN_BUCKETS, registry=self.registry,
        )
        self.e2e = Histogram(
            "hyla_e2e_request_latency_seconds", "Arrival to last token.", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self._engine = EngineStatsCollector()
        self.registry.register(self._engine)

    def count(self, protocol: str, endpoint: str, status: int | str) -> None:
        self.requests.labels(protocol, endpoint, str(status)).inc()

    def timer(self) -> RequestTimer:
        return RequestTimer(self)

    def render(self, stats: Any) -> tuple[bytes, str]:
        """The Prometheus text of every metric, the engine's from `stats` (read just before)."""
        self._engine.stats = stats
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Latencies of one engine request, observed as its outputs arrive."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.tokens = 0

    def advanced(self, new_tokens: int) -> None:
        if new_tokens and self.first_token is None:
            self.first_token = time.monotonic()
            self._metrics.ttft.observe(self.first_token - self.start)
        self.tokens += new_tokens

    def finished(self, reasons: list[str | None]) -> None:
        end = time.monotonic()
        self._metrics.e2e.observe(end - self.start)
        if self.first_token is not None and self.tokens > 1:
            self._metrics.tpot.observe((end - self.first_token) / (self.tokens - 1))
        for reason in reasons:
            self._metrics.finished.labels(reason or "unknown").inc()
