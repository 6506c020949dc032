"""Prometheus metrics: every metric is defined here, once, on a registry owned by one app.

The names are a contract with the deploy dashboards and autoscaling rules (deploy/): keep them.
Each app gets its own CollectorRegistry, so tests can run several servers in one process.
"""

from __future__ import annotations

import threading
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
GPU_STEP_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

OTHER = "other"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, max_adapter_labels: int = 32):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests_waiting = Gauge("scaleserve_requests_waiting", "requests queued, not yet running", registry=r)
        self.requests_running = Gauge("scaleserve_requests_running", "sequences in the running batch", registry=r)
        self.kv_cache_usage = Gauge("scaleserve_kv_cache_usage_ratio", "share of KV cache blocks in use", registry=r)
        self.ttft = Histogram("scaleserve_time_to_first_token_seconds", "arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("scaleserve_inter_token_latency_seconds", "time between consecutive tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("scaleserve_e2e_request_latency_seconds", "arrival to last token",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("scaleserve_prompt_tokens_total", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("scaleserve_generation_tokens_total", "tokens generated", registry=r)
        self.prefix_cache_queries = Counter("scaleserve_prefix_cache_queries_total",
                                            "prompt tokens admitted with prefix caching on", registry=r)
        self.prefix_cache_hits = Counter("scaleserve_prefix_cache_hits_total",
                                         "prompt tokens whose K/V came from the prefix cache", registry=r)
        self.adapter_requests = Counter("scaleserve_adapter_requests_total", "requests per adapter (bounded labels)",
                                        ["adapter"], registry=r)
        self.adapter_load = Histogram("scaleserve_adapter_load_seconds", "adapter copy into a device slab slot",
                                      buckets=LOAD_BUCKETS, registry=r)
        self.engine_steps = Counter("scaleserve_engine_steps_total", "engine steps by how the model ran: "
                                    "decode_graph, prefill_graph, split_graphs (decode + prefill graphs), eager",
                                    ["kind"], registry=r)
        self.overlapped_steps = Counter("scaleserve_engine_overlapped_steps_total",
                                        "engine steps dispatched while the host still processed the step before "
                                        "(settings.overlap_steps)", registry=r)
        self.gpu_step = Histogram("scaleserve_engine_gpu_step_seconds", "GPU time of an engine step's forward, from "
                                  "its inputs' upload to its last kernel, by kind (settings.gpu_step_timing)",
                                  ["kind"], buckets=GPU_STEP_BUCKETS, registry=r)
        self.kernel_compiles = Counter("scaleserve_kernel_compiles_after_ready_total",
                                       "Triton kernels compiled while serving, by kernel: warm-up missed their "
                                       "shape, and each compile stalled every running stream", ["kernel"],
                                       registry=r)
        self.errors = Counter("scaleserve_errors_total", "error responses and failed requests by type", ["type"],
                              registry=r)
        # bounded label cardinality: the first `max_adapter_labels` adapter names seen get their own
        # label; every later name counts as "other" (a replica restart re-picks the set).
        self._max_labels = max_adapter_labels
        self._labels: set[str] = set()
        self._lock = threading.Lock()

    def adapter_label(self, name: str) -> str:
        with self._lock:
            if name in self._labels:
                return name
            if len(self._labels) < self._max_labels and name != OTHER:
                self._labels.add(name)
                return name
        return OTHER

    def count_adapter_request(self, name: str) -> None:
        self.adapter_requests.labels(adapter=self.adapter_label(name)).inc()

    @staticmethod
    def observe_many(hist: Histogram, values: list[float]) -> None:
        """hist.observe(v) for each v, with one locked increment per touched bucket instead of two per value
        (the engine observes a whole step's inter-token latencies at once). Same buckets, count and sum."""
        bounds = getattr(hist, "_upper_bounds", None)
        buckets = getattr(hist, "_buckets", None)
        if len(values) < 3 or bounds is None or buckets is None or not hasattr(hist, "_sum"):
            for v in values:
                hist.observe(v)
            return
        counts: dict[int, int] = {}
        for v in values:  # observe() picks the first bound >= v, i.e. bisect_left
            i = bisect_left(bounds, v)
            counts[i] = counts.get(i, 0) + 1
        hist._sum.inc(sum(values))
        for i, c in counts.items():
            buckets[i].inc(c)

    def error(self, kind: str) -> None:
        self.errors.labels(type=kind).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
