"""The few figures of a result file that matter, as plain lines on standard output.

A lent GPU machine returns only 8 files and the tail of what a command printed, so
``benchmarks/gpu-session.sh`` prints these after each step and again, all together, at the
end: the printed output alone holds every result. ``python -m zimage_server.bench.keyfigures
FILE...`` prints them for each file (a missing or half-written file says so; never fails).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zimage_server.bench.report import dispatch_lines, summary_lines


def key_lines(report: Mapping[str, Any]) -> list[str]:
    kind = report.get("benchmark")
    if kind == "overhead":
        return _overhead(report["overhead"])
    if kind == "preview":
        return _preview(report["preview_overhead"])
    if kind == "lora":
        return _lora(report["lora_switch"])
    if kind == "dispatch":
        return dispatch_lines(report["dispatch"])
    return _model(report)


def _model(report: Mapping[str, Any]) -> list[str]:
    lines = [] if report.get("complete", True) else ["INCOMPLETE (cut short): figures so far"]
    for name, entry in report.get("variants", {}).items():
        for size, figures in entry.get("sizes", {}).items():
            lines.append(f"{name} {size}: p50 {figures['e2e_p50_s'] * 1e3:.1f} ms")
        if memory := entry.get("device_memory_gib"):
            lines.append(
                f"{name} GPU memory (GiB): " + ", ".join(f"{k} {v}" for k, v in memory.items())
            )
    return lines + summary_lines(report)


def _overhead(figures: Mapping[str, Any]) -> list[str]:
    arms = figures.get("arms", {})
    lines = [
        f"{arm} {figures['size']}: p50 {entry['p50_ms']:.2f} ms, p99 {entry['p99_ms']:.2f} ms"
        for arm, entry in arms.items()
    ]
    if "ratio_p50" in figures:
        lines.append(
            f"overhead vs floor (p50): {figures['ratio_p50']:.2f}x without a key, "
            f"{figures['ratio_p50_keyed']:.2f}x with one"
        )
    keyed = arms.get("ours_keyed", {}).get("stages_p50_ms", {})
    if "credits_hold" in keyed:
        disk = figures.get("disk_fsync_ms", {})
        lines.append(
            f"a key's cost (p50): check {keyed['auth']:.2f} ms, hold {keyed['credits_hold']:.2f}"
            f" ms, capture {keyed['credits_capture']:.2f} ms; this disk's fsync p50 "
            f"{disk.get('p50', float('nan')):.2f} ms"
        )
    for arm, entry in arms.items():
        load = entry.get("load")
        if load:
            lines.append(
                f"{arm} at concurrency {load['concurrency']}: {load['requests_s']:.0f} req/s, "
                f"p99 {load['p99_ms']:.1f} ms"
            )
    return lines or [f"ours p50 {figures['p50_ms']:.2f} ms, p99 {figures['p99_ms']:.2f} ms"]


def _preview(figures: Mapping[str, Any]) -> list[str]:
    return [
        f"previews at {figures['size']}: on/off paired median {figures['ratio_paired_median']:.3f}"
        f" (p50 {figures['off_p50_s']:.3f} s off, {figures['on_p50_s']:.3f} s on)",
        f"preview device time per render {figures['preview_on_device_p50_s'] * 1e3:.1f} ms",
    ]


def _lora(figures: Mapping[str, Any]) -> list[str]:
    first = ", ".join(f"{seconds * 1e3:.0f}" for seconds in figures["first_load_s"])
    lines = [
        f"loras at {figures['size']}: {figures['adapters']} adapters of rank {figures['rank']}"
        f" ({figures['adapter_mb']:.2f} MB each), first loads {first} ms"
    ]
    for concurrency, level in figures["concurrency"].items():
        plain, mixed = level["plain"], level["mixed"]
        lines.append(
            f"loras at concurrency {concurrency}: {mixed['img_s']:.2f} img/s mixed vs "
            f"{plain['img_s']:.2f} plain (x{level['ratio_img_s']:.2f}); LoRA p50 "
            f"{level['mixed_lora_requests']['e2e_p50_s']:.3f} s vs plain "
            f"{plain['e2e_p50_s']:.3f} s (x{level['ratio_p50_lora_vs_plain']:.2f}); "
            f"lora_load p50 {level['lora_load_p50_s'] * 1e3:.1f} ms, "
            f"p95 {level['lora_load_p95_s'] * 1e3:.1f} ms"
        )
    return lines


def file_lines(path: Path) -> list[str]:
    try:
        report = json.loads(path.read_text())
        return [f"{path.name}: {line}" for line in key_lines(report)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{path.name}: no figures ({type(exc).__name__}: {exc})"]


def main(paths: list[str]) -> None:
    for path in paths:
        for line in file_lines(Path(path)):
            sys.stdout.write(f"KEY {line}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
