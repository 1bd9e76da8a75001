"""Prometheus metrics: the server's own (requests, turns, time to first token, between
tokens) and the runtime's statistics, read when scraped."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import Runtime
from ._turns import Conversations

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _RuntimeCollector(Collector):
    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self.conversations: Conversations | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._rt.statistics()
        gauges = {
            "agents": (s.agents, "agents, active or stored"),
            "agents_active": (s.agents_active, "agents with an actor in memory"),
            "turns_in_flight": (s.turns_in_flight, "turns queued or running (queue depth)"),
            "peak_batch_size": (s.peak_batch_size, "the largest batch the engine ran"),
            "kv_hot_bytes": (s.kv_hot_bytes, "bytes of KV held in memory"),
            "kv_budget_bytes": (s.kv_budget, "the KV memory budget"),
            "blocks_in_memory": (s.blocks_in_memory, "KV blocks in memory"),
            "blocks_on_disk": (s.blocks_on_disk, "KV blocks in the store"),
        }
        for name, (value, doc) in gauges.items():
            yield GaugeMetricFamily(f"troupe_{name}", doc, value=value)
        counters = {
            "turns_completed": (s.turns_completed, "turns completed"),
            "turns_failed": (s.turns_failed, "turns failed"),
            "turns_cancelled": (s.turns_cancelled, "turns cancelled"),
            "tokens_generated": (s.tokens_generated, "tokens generated"),
            "tokens_prefilled": (s.tokens_prefilled, "prompt tokens prefilled"),
            "tokens_reused": (s.tokens_reused, "prompt tokens reused from KV blocks"),
            "restores": (s.restores, "KV blocks loaded from disk"),
            "evictions": (s.evictions, "KV blocks evicted from memory"),
            "engine_steps": (s.engine_steps, "engine steps"),
        }
        for name, (value, doc) in counters.items():
            yield CounterMetricFamily(f"troupe_{name}", doc, value=value)
        if self.conversations is not None:
            yield GaugeMetricFamily("troupe_http_kept_conversations",
                                    "stateless conversations kept for their clients",
                                    value=self.conversations.kept)
            yield CounterMetricFamily("troupe_http_conversations_resumed",
                                      "stateless requests answered by a kept conversation",
                                      value=self.conversations.resumed)


class Metrics:
    """One registry per server, so that two servers in one process do not collide."""

    def __init__(self, rt: Runtime) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("troupe_http_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.ttft = Histogram("troupe_http_time_to_first_token_seconds",
                              "streamed turns: seconds from the request to the first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("troupe_http_inter_token_seconds",
                                     "streamed turns: seconds between deltas",
                                     buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.duration = Histogram("troupe_http_request_seconds", "request durations",
                                  ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self._collector = _RuntimeCollector(rt)
        self.registry.register(self._collector)

    def watch(self, conversations: Conversations) -> None:
        self._collector.conversations = conversations

    def render(self) -> bytes:
        return generate_latest(self.registry)
