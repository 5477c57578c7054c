"""``--dispatch``: does a worker ever wait for the API between batches?

The null generator with a synthetic render time (``ZIMAGE_DEBUG_STEP_DELAY_S`` times the
steps) stands in for the device, so a worker that never idles serves exactly
``1 / render_s`` images per second; what falls short is time the worker spent waiting for
the API (result transfer, settling, the next batch's dispatch). At concurrency 8, at
1024x1024 and 2048x2048, one server after the other on this machine: ``before`` (one batch
at a time, images pickled through the pipe: the engine before dispatch-ahead), ``ahead_pipe``
(the next batch sent ahead, images still pickled) and ``ahead`` (the defaults: ahead, images
in shared memory). Images/s are counted between the first and the last response (both
carry one encode and one response's latency, which cancel), so the run's start and the last
image's encode do not count as worker idle time. ``efficiency`` is images/s times
``render_s``; the target is >= 0.95.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from zimage_server.bench.environment import resolve_device
from zimage_server.bench.overhead import _null_server
from zimage_server.bench.runner import BenchConfig, _data_dir, base_report, size_key
from zimage_server.bench.server import Client
from zimage_server.bench.stats import Sample, summarize

CONCURRENCY = 8
STEPS = 4
ARMS: dict[str, dict[str, str]] = {
    "before": {"ZIMAGE_DISPATCH_AHEAD": "0", "ZIMAGE_SHARED_MEMORY_RESULTS": "false"},
    "ahead_pipe": {"ZIMAGE_DISPATCH_AHEAD": "1", "ZIMAGE_SHARED_MEMORY_RESULTS": "false"},
    "ahead": {},  # the defaults
}


@dataclass(frozen=True)
class Plan:
    """What ``--dispatch`` runs (smaller in its smoke test)."""

    sizes: tuple[int, ...] = (1024, 2048)
    requests: int = 5 * CONCURRENCY  # timed, per arm and size, after CONCURRENCY untimed
    step_delay_s: float = 0.1  # a render is STEPS x this

    @property
    def render_s(self) -> float:
        return STEPS * self.step_delay_s


def run_dispatch(config: BenchConfig, plan: Plan = Plan()) -> dict[str, Any]:
    """Throughput against ``1 / render_s`` for each arm and size."""
    report = base_report(config, resolve_device("cpu"), "dispatch")
    arms = {}
    with _data_dir(config) as data:
        for arm, env in ARMS.items():
            settings = {**env, "ZIMAGE_DEBUG_STEP_DELAY_S": str(plan.step_delay_s)}
            with _null_server(config, data / arm, settings, arm) as server:
                client = Client(server.url, None)
                try:
                    arms[arm] = {
                        size_key(size): _measure(client, config, size, plan) for size in plan.sizes
                    }
                finally:
                    client.close()
    report["dispatch"] = {
        "render_s": plan.render_s,
        "ideal_images_s": 1 / plan.render_s,
        "concurrency": CONCURRENCY,
        "requests": plan.requests,
        "arms": arms,
    }
    return report


def _measure(client: Client, config: BenchConfig, size: int, plan: Plan) -> dict[str, Any]:
    body = {**config.body(size), "steps": STEPS}
    client.throughput(body, CONCURRENCY, CONCURRENCY)  # warm: every slot and connection
    finished, samples = _completions(client, body, plan.requests)
    rate = (len(finished) - 1) / (finished[-1] - finished[0])
    summary = summarize(samples)
    return {
        "images_s": rate,
        "efficiency": rate * plan.render_s,
        "e2e_p50_s": summary["e2e_p50_s"],
        "image_encode_p50_s": summary["stages_p50_s"].get("image_encode", 0.0),
    }


def _completions(
    client: Client, body: dict[str, Any], requests: int
) -> tuple[list[float], list[Sample]]:
    """``requests`` renders from ``CONCURRENCY`` clients: when each answer arrived, sorted."""
    lock, finished, samples = threading.Lock(), [], []

    def one(index: int) -> None:
        sample, _ = client.render({**body, "seed": index})
        with lock:
            finished.append(time.perf_counter())
            samples.append(sample)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, range(requests)))
    return sorted(finished), samples
