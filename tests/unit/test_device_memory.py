"""GPU memory in ``/metrics``: what each worker's batch left allocated, reserved and at peak.

A CPU has no device memory to report, so CPU workers send none and no series appears.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from zimage_server.bench.keyfigures import key_lines
from zimage_server.bench.server import device_memory_gib
from zimage_server.core.config import SpeedupSettings, WorkerSettings
from zimage_server.engine.generator import DiffusersGenerator
from zimage_server.engine.protocol import AdapterStats, BatchDone, DeviceMemory, WorkerSpec
from zimage_server.telemetry.metrics import Metrics

GIB = 2**30


def samples(metrics: Metrics, name: str) -> dict[tuple[str, ...], float]:
    families = text_string_to_metric_families(metrics.render().decode())
    return {
        tuple(sorted(s.labels.items())): s.value  # type: ignore[misc]
        for family in families
        for s in family.samples
        if s.name == name
    }


def test_a_batch_sets_its_workers_memory_and_adapter_gauges() -> None:
    metrics = Metrics()
    memory = DeviceMemory(allocated=24 * GIB, reserved=30 * GIB, peak=28 * GIB, total=141 * GIB)
    done = BatchDone("b", (), adapters=AdapterStats(loaded=1, memory_bytes=5), memory=memory)
    metrics.record_batch("worker-1", done)
    got = samples(metrics, "zimage_device_memory_bytes")
    assert got[(("kind", "allocated"), ("worker", "worker-1"))] == 24 * GIB
    assert got[(("kind", "peak"), ("worker", "worker-1"))] == 28 * GIB
    assert len(got) == 4
    assert samples(metrics, "zimage_adapter_bytes") == {(("worker", "worker-1"),): 5}
    smaller = DeviceMemory(allocated=GIB, reserved=2 * GIB, peak=GIB, total=141 * GIB)
    metrics.record_batch("worker-1", BatchDone("c", (), memory=smaller))  # gauges, not sums
    assert (
        samples(metrics, "zimage_device_memory_bytes")[
            (("kind", "reserved"), ("worker", "worker-1"))
        ]
        == 2 * GIB
    )


def test_a_cpu_worker_reports_no_device_memory() -> None:
    metrics = Metrics()
    metrics.record_batch("worker-0", BatchDone("b", ()))
    assert samples(metrics, "zimage_device_memory_bytes") == {}
    spec = WorkerSpec(
        name="w",
        model_path="unused",
        device="cpu",
        worker=WorkerSettings(),
        speedups=SpeedupSettings(),
    )
    assert DiffusersGenerator(spec).device_memory() is None


def test_the_benchmark_reads_the_first_workers_memory_from_metrics() -> None:
    metrics = Metrics()
    for worker, allocated in (("worker-1", 30), ("worker-0", 24)):
        memory = DeviceMemory(allocated * GIB, 32 * GIB, 28 * GIB, 141 * GIB)
        metrics.record_batch(worker, BatchDone("b", (), memory=memory))
    gib = device_memory_gib(metrics.render().decode())
    assert gib == {"allocated": 24.0, "reserved": 32.0, "peak": 28.0, "total": 141.0}
    assert device_memory_gib(Metrics().render().decode()) == {}  # a CPU server: none
    report = {"benchmark": "model", "variants": {"ours_bf16": {"device_memory_gib": gib}}}
    assert "ours_bf16 GPU memory (GiB): allocated 24.0, reserved 32.0" in "\n".join(
        key_lines(report)
    )
