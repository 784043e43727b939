"""Prometheus metrics of one server, in a registry of its own (so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# CPU generation takes from milliseconds (tiny models) to tens of seconds (long answers on real ones).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SWAP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class ServeMetrics:
    """Requests, tokens and latency per diff (labels ``diff`` and ``version``; the base has version "")
    plus the engine's swaps and queue."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        per_diff = ["diff", "version"]
        self.requests = Counter(
            "sparseft_requests", "Completed generation requests", per_diff + ["endpoint"], registry=self.registry
        )
        self.request_errors = Counter(
            "sparseft_request_errors", "Requests answered with an error", ["endpoint", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter("sparseft_prompt_tokens", "Prompt tokens processed", per_diff, registry=self.registry)
        self.completion_tokens = Counter(
            "sparseft_completion_tokens", "Tokens generated", per_diff, registry=self.registry
        )
        self.latency = Histogram(
            "sparseft_request_latency_seconds",
            "Time from admission to the last token, queueing included",
            per_diff,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "sparseft_queue_wait_seconds", "Time a request waited for the worker", buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.swaps = Counter("sparseft_swaps", "Weight switches between diffs (or the base)", registry=self.registry)
        self.swap_seconds = Histogram(
            "sparseft_swap_seconds", "Time to restore the previous diff's entries and merge the next one",
            buckets=SWAP_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge("sparseft_queue_depth", "Requests waiting for the worker", registry=self.registry)
        self.diff_versions = Gauge("sparseft_diff_versions_loaded", "Diff versions held in memory", registry=self.registry)
        self.batch_rows = Gauge("sparseft_batch_rows", "Requests in the running batch (batching strategies)",
                                registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
