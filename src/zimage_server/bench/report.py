"""The benchmark's outputs: a rich table on the console and a JSON file in the results folder."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from zimage_server.bench.environment import slug

STAGES = ("queue_wait", "text_encode", "denoise", "vae_decode", "image_encode", "pipeline")


def result_path(report: Mapping[str, Any], results_dir: Path) -> Path:
    """``<date>-<device>.json``, or ``-overhead`` / ``-preview`` / ``-lora`` / ``-dispatch``."""
    suffixes = {
        "overhead": "-overhead",
        "preview": "-preview",
        "lora": "-lora",
        "dispatch": "-dispatch",
    }
    suffix = suffixes.get(str(report.get("benchmark")), "")
    return results_dir / f"{report['date']}-{slug(str(report['device']))}{suffix}.json"


def write_report(report: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return path


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:,.1f}"


def variants_table(report: Mapping[str, Any]) -> Table:
    table = Table(title=f"{report['model']} on {report['device']}: end to end, ms (p50)")
    for column in ("variant", "size", "p50", "p90", *STAGES):
        table.add_column(column, justify="left" if column in ("variant", "size") else "right")
    for name, entry in report["variants"].items():
        if "error" in entry:
            table.add_row(name, "failed", *([""] * (len(STAGES) + 2)))
        for size, figures in entry.get("sizes", {}).items():
            stages = figures["stages_p50_s"]
            table.add_row(
                name,
                size,
                _ms(figures["e2e_p50_s"]),
                _ms(figures["e2e_p90_s"]),
                *(_ms(stages.get(stage)) for stage in STAGES),
            )
    return table


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    lines = []
    for key in ("speedup_vs_stock", "speedup_vs_stock_cfg_off"):
        if key in report:
            lines.append(f"{key}: {report[key]:.2f}x")
    if report.get("device") != "cpu" and report.get("speedup_vs_stock_cfg_off", 1.0) < 1.0:
        lines.append(  # on the first H200 run: the model had been cast to float32
            "WARNING: ours is slower than stock with CFG off, the same computation: check the "
            "server log's ready line (dtype, memory) and for compiles after warm-up"
        )
    for concurrency, rate in report.get("throughput_img_s", {}).items():
        lines.append(f"throughput at concurrency {concurrency}: {rate:.2f} images/s")
    for size, figures in report.get("denoise", {}).items():
        lines.append(
            f"denoise {size}: {figures['tflop_total']:.3g} TFLOP in "
            f"{figures['denoise_p50_s']:.3f} s = {figures['achieved_tflops']:.3g} TFLOP/s "
            f"(floor {figures['floor_s']:.3f} s at "
            f"{report['settings']['peak_tflops_assumed']:g} TFLOP/s)"
        )
    for name, entry in report.get("variants", {}).items():
        if "error" in entry:
            lines.append(f"{name} failed: {entry['error'].splitlines()[0]}")
        if "speedup_vs_ours_bf16" in entry:
            lines.append(f"{name}: {entry['speedup_vs_ours_bf16']:.2f}x ours_bf16's speed")
        for key, dev in entry.items():
            if key.startswith("deviation_vs_"):
                psnr = "identical" if dev["psnr_db"] is None else f"PSNR {dev['psnr_db']:.1f} dB"
                lines.append(
                    f"{name} {key}: max {dev['max_abs']:g}, mean {dev['mean_abs']:.3g}, {psnr}"
                )
    return lines


def overhead_table(report: Mapping[str, Any]) -> Table:
    figures = report["overhead"]
    title = f"server overhead, null generator, {figures['size']} ({report['device']})"
    if "disk_fsync_ms" in figures:
        title += f"; this disk's fsync p50 {figures['disk_fsync_ms']['p50']:.2f} ms"
    table = Table(title=title)
    columns = ("arm", "requests", "p50 ms", "p90 ms", "p99 ms", "vs floor (p50)")
    for column in (*columns, "encode p50 ms", "key p50 ms", "c32 req/s", "c32 p99 ms"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    floor_p50 = figures.get("arms", {}).get("floor", figures)["p50_ms"]
    for arm, entry in figures.get("arms", {"ours": figures}).items():
        load = entry.get("load", {})
        table.add_row(
            arm,
            str(entry["requests"]),
            f"{entry['p50_ms']:.2f}",
            f"{entry['p90_ms']:.2f}",
            f"{entry['p99_ms']:.2f}",
            f"{entry['p50_ms'] / floor_p50:.2f}x",
            f"{entry['stages_p50_ms'].get('image_encode', 0.0):.2f}",
            _key_cost(entry["stages_p50_ms"]),
            f"{load['requests_s']:.0f}" if load else "",
            f"{load['p99_ms']:.1f}" if load else "",
        )
    return table


def _key_cost(stages: Mapping[str, float]) -> str:
    """What the key adds, as its request timed it: check + hold + capture."""
    parts = [stages.get(name) for name in ("auth", "credits_hold", "credits_capture")]
    return f"{sum(p for p in parts if p is not None):.2f}" if parts[1] is not None else ""


def preview_table(report: Mapping[str, Any]) -> Table:
    figures = report["preview_overhead"]
    title = (
        f"step previews ({figures['preview_size']} px), {report['model']} at {figures['size']}, "
        f"{figures['steps']} steps ({report['device']})"
    )
    table = Table(title=title)
    for column in (
        "pairs",
        "off p50 s",
        "on p50 s",
        "on / off",
        "paired median",
        "compute ms",
        "encode ms",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        str(figures["requests_each"]),
        f"{figures['off_p50_s']:.3f}",
        f"{figures['on_p50_s']:.3f}",
        f"{figures['ratio_p50']:.3f}",
        f"{figures['ratio_paired_median']:.3f}",
        f"{figures['compute_ms_per_step_p50']:.2f}",
        f"{figures['encode_ms_per_step_p50']:.2f}",
    )
    return table


def lora_table(report: Mapping[str, Any]) -> Table:
    figures = report["lora_switch"]
    title = (
        f"LoRA switching: {figures['adapters']} adapters of rank {figures['rank']} "
        f"(slots {figures['slot_rank']}), {report['model']} at {figures['size']} "
        f"({report['device']})"
    )
    table = Table(title=title)
    columns = ("concurrency", "traffic", "img/s", "p50 s", "p95 s", "lora_load p50/p95 ms")
    for column in columns:
        table.add_column(column, justify="left" if column == "traffic" else "right")
    for concurrency, level in figures["concurrency"].items():
        loads = f"{level['lora_load_p50_s'] * 1e3:.1f} / {level['lora_load_p95_s'] * 1e3:.1f}"
        for traffic in ("plain", "mixed", "mixed_lora_requests"):
            entry = level[traffic]
            table.add_row(
                concurrency,
                traffic,
                f"{entry['img_s']:.2f}" if "img_s" in entry else "",
                f"{entry['e2e_p50_s']:.3f}",
                f"{entry['e2e_p95_s']:.3f}",
                loads if traffic == "mixed_lora_requests" else "",
            )
    return table


def dispatch_lines(figures: Mapping[str, Any]) -> list[str]:
    """``--dispatch``: per arm and size, images/s and their share of ``1 / render_s``."""
    return [
        f"dispatch {arm} {size}: {entry['images_s']:.3f} img/s at concurrency "
        f"{figures['concurrency']}, {entry['efficiency']:.3f} of 1/render_time"
        f" ({figures['render_s']:g} s)"
        for arm, sizes in figures["arms"].items()
        for size, entry in sizes.items()
    ]


def show(report: Mapping[str, Any], console: Console) -> None:
    tables = {"overhead": overhead_table, "preview": preview_table, "lora": lora_table}
    table = tables.get(str(report.get("benchmark")))
    if table is not None:
        console.print(table(report))
        return
    if report.get("benchmark") == "dispatch":
        for line in dispatch_lines(report["dispatch"]):
            console.print(line)
        return
    console.print(variants_table(report))
    for line in summary_lines(report):
        console.print(line)
