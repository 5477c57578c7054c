"""What per-step previews cost a render (``--preview-overhead``).

One server, one request, streamed (``Accept: text/event-stream``) with previews off and on
(``preview_size`` 256, what ``preview: true`` asks for), alternated pair by pair so both
see the same machine: the ratio of their p50s, the median of the pairs' ratios, and what
the server reports the previews cost (on the device per render, and per step to compute
and to WebP-encode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zimage_server.bench.environment import resolve_device
from zimage_server.bench.runner import (
    BenchConfig,
    Variant,
    _data_dir,
    _server,
    base_report,
    size_key,
)
from zimage_server.bench.server import Client
from zimage_server.bench.stats import Sample, percentile, summarize
from zimage_server.bench.stock import ModelChoice

PREVIEW_SIZE = 256
Runs = dict[str, list[Sample]]


def run_preview_overhead(config: BenchConfig) -> dict[str, Any]:
    """Render time with previews off and on, in the same server process."""
    device = resolve_device(config.device)
    report = base_report(config, device, "preview")
    off = config.body(config.primary)
    on = {**off, "preview_size": PREVIEW_SIZE}
    with _data_dir(config) as data:
        model = ModelChoice(config.model, data)
        with _server(config, model, device, Variant("previews")) as server:
            client = Client(server.url, config.api_key)
            try:
                runs, previews = _alternate(client, off, on, config)
            finally:
                client.close()
    report["preview_overhead"] = _figures(config, runs, previews)
    return report


def _alternate(
    client: Client, off: Mapping[str, Any], on: Mapping[str, Any], config: BenchConfig
) -> tuple[Runs, list[dict[str, Any]]]:
    """``iterations`` pairs, off first in even pairs and on first in odd ones."""
    for _ in range(config.warmup):
        client.streamed(off)
        client.streamed(on)
    runs: Runs = {"off": [], "on": []}
    previews: list[dict[str, Any]] = []
    for index in range(config.iterations):
        for name in ("off", "on") if index % 2 == 0 else ("on", "off"):
            sample, shown = client.streamed(on if name == "on" else off)
            runs[name].append(sample)
            previews.extend(shown)
    return runs, previews


def _figures(config: BenchConfig, runs: Runs, previews: list[dict[str, Any]]) -> dict[str, Any]:
    off, on = summarize(runs["off"]), summarize(runs["on"])
    pairs = [b.e2e_s / a.e2e_s for a, b in zip(runs["off"], runs["on"], strict=True)]
    ratio = on["e2e_p50_s"] / off["e2e_p50_s"]
    return {
        "size": size_key(config.primary),
        "steps": config.steps,
        "preview_size": PREVIEW_SIZE,
        "requests_each": len(runs["on"]),
        "off_p50_s": off["e2e_p50_s"],
        "on_p50_s": on["e2e_p50_s"],
        "off_p90_s": off["e2e_p90_s"],
        "on_p90_s": on["e2e_p90_s"],
        "ratio_p50": ratio,
        "ratio_paired_median": percentile(pairs, 50),
        "overhead_pct": (ratio - 1) * 100,
        "denoise_off_p50_s": off["stages_p50_s"].get("denoise", 0.0),
        "denoise_on_p50_s": on["stages_p50_s"].get("denoise", 0.0),
        "preview_on_device_p50_s": on["stages_p50_s"].get("preview", 0.0),
        "previews_per_render": len(previews) / max(1, len(runs["on"])),
        "compute_ms_per_step_p50": _median(previews, "compute_ms"),
        "encode_ms_per_step_p50": _median(previews, "encode_ms"),
    }


def _median(previews: list[dict[str, Any]], key: str) -> float:
    values = [float(preview[key]) for preview in previews if key in preview]
    return percentile(values, 50) if values else 0.0
