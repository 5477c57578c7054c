"""Prometheus metrics, in a registry per app (tests build several apps in one process).

Label cardinality is bounded: routes are path templates, and at most ``MAX_KEYS`` API-key
prefixes get their own series; the rest share ``"other"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from zimage_server.engine.protocol import AdapterStats, BatchDone, DeviceMemory

MAX_KEYS = 200
ADAPTER_LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SHARED_DROP_REASONS = ("queue_full", "redis_unavailable", "refused")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "zimage_requests",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "zimage_request_duration_seconds",
            "Whole-request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stages = Histogram(
            "zimage_stage_duration_seconds",
            "Per-stage latency of a render",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "zimage_batch_size",
            "Images per engine batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16),
            registry=r,
        )
        self.images = Counter("zimage_images", "Images delivered, by key", ["key"], registry=r)
        self.prompt_embeddings = Counter(
            "zimage_prompt_embeddings",
            "Prompt embeddings by source: encoded, cache, or prefetch (encoded while the "
            "previous batch denoised)",
            ["source"],
            registry=r,
        )
        self.gpu_seconds = Counter(
            "zimage_gpu_seconds",
            "Accelerator seconds (encode + denoise + decode) by key",
            ["key"],
            registry=r,
        )
        self.queue_depth = Gauge("zimage_queue_depth", "Renders waiting or running", registry=r)
        self.worker_restarts = Gauge(
            "zimage_worker_restarts", "Worker processes restarted since start", registry=r
        )
        self.model_load = Gauge(
            "zimage_model_load_seconds",
            "Time the last worker took to load and warm up",
            registry=r,
        )
        self.ready = Gauge("zimage_ready", "1 when the model is loaded and serving", registry=r)
        self.cluster_depth = Gauge(
            "zimage_cluster_queue_depth",
            "Jobs not yet finished in the whole cluster (from the store)",
            registry=r,
        )
        self.cluster_oldest = Gauge(
            "zimage_cluster_oldest_wait_seconds",
            "Age of the oldest unfinished job in the whole cluster (from the store)",
            registry=r,
        )
        self.cluster_task_oldest = Gauge(
            "zimage_cluster_task_oldest_wait_seconds",
            "Age of the oldest unfinished job of each task in the whole cluster: only the "
            "processes that render a task take its jobs",
            ["task"],
            registry=r,
        )
        self._adapter_metrics(r)
        self._shared_event_metrics(r)
        self._keys: set[str] = set()

    def _adapter_metrics(self, r: CollectorRegistry) -> None:
        self.device_memory = Gauge(
            "zimage_device_memory_bytes",
            "A worker's GPU memory after its last batch, by kind: allocated (tensors), "
            "reserved (PyTorch's cache), peak (the most allocated during that batch), total",
            ["worker", "kind"],
            registry=r,
        )
        self.adapters_loaded = Gauge(
            "zimage_adapters_loaded", "LoRA adapters kept loaded, by worker", ["worker"], registry=r
        )
        self.adapter_bytes = Gauge(
            "zimage_adapter_bytes",
            "Device memory the loaded LoRA adapters' weights take, by worker",
            ["worker"],
            registry=r,
        )
        self.adapter_lookups = Counter(
            "zimage_adapter_cache_lookups",
            "LoRA adapter cache lookups by result: hit (kept loaded) or miss (read from disk)",
            ["result"],
            registry=r,
        )
        self.adapter_evictions = Counter(
            "zimage_adapter_cache_evictions",
            "LoRA adapters dropped from a worker's cache (count or memory bound)",
            registry=r,
        )
        self.adapter_load = Histogram(
            "zimage_adapter_load_seconds",
            "Reading one LoRA adapter onto the device (a cache miss)",
            buckets=ADAPTER_LOAD_BUCKETS,
            registry=r,
        )

    def _shared_event_metrics(self, r: CollectorRegistry) -> None:
        self.shared_events_written = Counter(
            "zimage_shared_events_written",
            "v2 job events copied into Redis for the other API processes",
            registry=r,
        )
        self.shared_events_dropped = Counter(
            "zimage_shared_events_dropped",
            "v2 job events Redis never got, by reason: queue_full (the writer fell behind), "
            "redis_unavailable (Redis down or slow), refused (Redis answered with an error)",
            ["reason"],
            registry=r,
        )
        for reason in SHARED_DROP_REASONS:  # every series shown from the start, at 0
            self.shared_events_dropped.labels(reason)

    def watch(
        self,
        depth: Callable[[], float],
        restarts: Callable[[], float],
        load_s: Callable[[], float],
        ready: Callable[[], float],
    ) -> None:
        """Gauges read live values from the engine at scrape time."""
        self.queue_depth.set_function(depth)
        self.worker_restarts.set_function(restarts)
        self.model_load.set_function(load_s)
        self.ready.set_function(ready)

    def key_label(self, prefix: str | None) -> str:
        if prefix is None:
            return "anonymous"
        if prefix in self._keys or len(self._keys) < MAX_KEYS:
            self._keys.add(prefix)
            return prefix
        return "other"

    def record_render(
        self,
        key: str | None,
        timings: dict[str, float],
        batch_size: int,
        images: int = 1,
        prompt_source: str = "",
    ) -> None:
        if prompt_source:
            self.prompt_embeddings.labels(prompt_source).inc(images)
        for stage, seconds in timings.items():
            self.stages.labels(stage).observe(seconds)
        self.batch_size.observe(batch_size)
        label = self.key_label(key)
        self.images.labels(label).inc(images)
        gpu = sum(timings.get(s, 0.0) for s in ("text_encode", "denoise", "vae_decode"))
        self.gpu_seconds.labels(label).inc(gpu)

    def record_batch(self, worker: str, done: BatchDone) -> None:
        """What a worker reports with each finished batch: its LoRA cache, its GPU memory."""
        if done.adapters is not None:
            self.record_adapters(worker, done.adapters)
        if done.memory is not None:
            self.record_memory(worker, done.memory)

    def record_memory(self, worker: str, memory: DeviceMemory) -> None:
        for kind in ("allocated", "reserved", "peak", "total"):
            self.device_memory.labels(worker, kind).set(getattr(memory, kind))

    def record_adapters(self, worker: str, stats: AdapterStats) -> None:
        """A worker's cache after a batch: gauges set, the counts since its last report added."""
        self.adapters_loaded.labels(worker).set(stats.loaded)
        self.adapter_bytes.labels(worker).set(stats.memory_bytes)
        self.adapter_lookups.labels("hit").inc(stats.hits)
        self.adapter_lookups.labels("miss").inc(stats.misses)
        self.adapter_evictions.inc(stats.evictions)
        for seconds in stats.load_s:
            self.adapter_load.observe(seconds)

    def record_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
