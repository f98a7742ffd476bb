"""Prometheus metrics of the gateway, in a registry of its own (one per app, so tests can run several).

Every inference series carries the served `version`, so a canary and production compare on one
dashboard; `replica` is the replica's port-qualified name.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kiln_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.queue_wait = Histogram(
            "kiln_queue_wait_seconds", "time waiting for admission", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "kiln_time_to_first_token_seconds", "request start to first token", ["route", "version"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "kiln_request_latency_seconds", "request start to last byte", ["route", "version"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("kiln_prompt_tokens", "prompt tokens evaluated", ["version"], registry=r)
        self.completion_tokens = Counter("kiln_completion_tokens", "tokens generated", ["version"], registry=r)
        self.tokens_per_second = Histogram(
            "kiln_generation_tokens_per_second", "completion tokens / generation time per request", ["version"],
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500), registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("kiln_requests_in_flight", "admitted requests not finished", registry=r)
        self.queued = Gauge("kiln_requests_queued", "requests waiting for admission", registry=r)
        self.rejected = Counter("kiln_rejected", "429s by reason (overload, rate_limit)", ["reason"], registry=r)
        self.retries = Counter("kiln_retries", "requests retried on another replica", ["version"], registry=r)
        self.replica_up = Gauge(
            "kiln_replica_up", "1 when the replica is warm and healthy", ["replica", "version"], registry=r
        )
        self.replica_restarts = Counter("kiln_replica_restarts", "replicas restarted", ["replica"], registry=r)
        self.served = Gauge("kiln_served_version", "1 for each version taking traffic", ["version", "role"], registry=r)
        self.swaps = Counter("kiln_version_swaps", "hot swaps completed", registry=r)
        self.add_production_metrics()

    def add_production_metrics(self) -> None:
        """How requests ended and what each replica is doing (issue: the gateway under production traffic)."""
        r = self.registry
        self.outcomes = Counter(
            "kiln_request_outcomes", "requests by how they ended: completed, failed (mid-stream included), "
            "client_disconnected (499), rejected", ["route", "outcome", "status"], registry=r,
        )  # fmt: skip
        self.inter_token = Histogram(
            "kiln_inter_token_seconds", "gap between a stream's successive upstream chunks", ["version"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r,
        )  # fmt: skip
        self.replica_state = Gauge(
            "kiln_replica_state", "1 for the replica's current state (ready, starting, failed, unresponsive, ...)",
            ["replica", "version", "state"], registry=r,
        )  # fmt: skip
        self.replica_backoff = Gauge(
            "kiln_replica_restart_backoff_seconds", "wait before a failed replica's next start", ["replica"], registry=r
        )
        self.replica_slots = Gauge(
            "kiln_replica_requests", "llama-server's own slot metrics, per replica: processing, deferred",
            ["replica", "version", "kind"], registry=r,
        )  # fmt: skip
        self.hung = Counter("kiln_replica_hung", "attempts that got no first token in time", ["replica"], registry=r)
        self.canary_failed = Gauge("kiln_canary_start_failed", "1 when the canary could not start", registry=r)
        self.swap_failures = Counter("kiln_version_swap_failures", "hot swaps that failed", ["version"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
