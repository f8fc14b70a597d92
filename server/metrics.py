"""Prometheus series of the service, on a registry of its own per app."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_SCORE_BUCKETS = (1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "firm_requests", "HTTP requests by route and status code.", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "firm_request_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter(
            "firm_items",
            "Scored items by task and outcome (ok or an error code).",
            ["task", "outcome"],
            registry=r,
        )
        self.parse_failures = Counter(
            "firm_parse_failures", "Judge answers that held no valid score.", ["judge"], registry=r
        )
        self.engine_batch_size = Histogram(
            "firm_engine_batch_size",
            "Judge calls per engine batch.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.engine_batch_seconds = Histogram(
            "firm_engine_batch_seconds",
            "Time per engine batch.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_failures = Counter(
            "firm_engine_failures",
            "Engine calls that failed: a batch, or a part of one split to find the call that broke it.",
            ["model"],
            registry=r,
        )
        self.batch_loop_restarts = Counter(
            "firm_batch_loop_restarts",
            "Times a model's batch loop died, failed its pending calls and was started again.",
            ["model"],
            registry=r,
        )
        self.cancelled_calls = Counter(
            "firm_cancelled_calls",
            "Judge calls dropped or stopped because their request went away.",
            ["model"],
            registry=r,
        )
        self.cache_hits = Counter(
            "firm_cache_hits",
            "Judge calls answered from the cache or shared with an identical call.",
            ["model"],
            registry=r,
        )
        self.rejected = Counter(
            "firm_rejected_requests",
            "Requests refused before any work: overload, draining, deadline.",
            ["reason"],
            registry=r,
        )
        self.replayed = Counter(
            "firm_replayed_requests", "Retried requests (same X-Request-ID) answered with the first answer.", registry=r
        )
        self.in_flight = Gauge(
            "firm_requests_in_flight", "Scoring requests taken and not yet answered (decoding included).", registry=r
        )
        self.queue_depth = Gauge("firm_queue_depth", "Judge calls waiting for an engine batch.", ["model"], registry=r)
        self.scores = Histogram(
            "firm_judge_score",
            "Scores each judge dimension gave.",
            ["dimension"],
            buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.unchanged_items = Counter(
            "firm_unchanged_items",
            "Scored edits whose output is nearly identical to its input (mean pixel distance under 0.01).",
            ["task"],
            registry=r,
        )
        self.fooled_items = Counter(
            "firm_unchanged_high_score",
            "Unchanged edits the judge still gave a primary score of 4 or more: a judge fooled.",
            ["task"],
            registry=r,
        )
        self.zero_spread_groups = Counter(
            "firm_zero_spread_groups",
            "Scored groups whose rewards all came out equal (no advantage to learn from).",
            ["task"],
            registry=r,
        )
        self.max_score_share = Gauge(
            "firm_max_score_share",
            "Share of maximum (5) scores per dimension, in the last window and in the baseline.",
            ["task", "dimension", "window"],
            registry=r,
        )
        self.score_disagreement = Gauge(
            "firm_score_disagreement",
            "Mean |score - expected| per dimension, in the last window and in the baseline.",
            ["task", "dimension", "window"],
            registry=r,
        )
        self.canary_drift = Gauge(
            "firm_canary_drift",
            "Canary items whose last answer differs from the reference (0 is clean).",
            ["task"],
            registry=r,
        )
        self.canary_runs = Counter(
            "firm_canary_runs",
            "Canary runs by outcome: clean, drift or failed (no answer from the engine).",
            ["task", "outcome"],
            registry=r,
        )
