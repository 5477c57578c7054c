"""One benchmark run: stock pipeline, then each server variant, then the derived numbers.

The stock pipeline runs first, in this process, and is freed before any server starts:
two full-size copies (about 20 GB each in bf16) would fit an 80 GB GPU, but freeing keeps
the harness correct on smaller cards at no cost in accuracy.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zimage_server.bench.environment import (
    device_name,
    host_info,
    package_versions,
    resolve_device,
    today,
)
from zimage_server.bench.server import BenchError, BenchServer, Client
from zimage_server.bench.stats import deviation, summarize, transformer_flops
from zimage_server.bench.stock import ModelChoice, StockRunner

DEFAULT_PROMPT = (
    "a lighthouse on a rocky cliff at dawn, waves breaking below, volumetric light, "
    "35mm photograph, high detail"
)
OURS = "ours_bf16"


@dataclass(frozen=True)
class Variant:
    """A server configuration to measure: ``env`` is added to the server's environment.

    Lossy variants (fp8, step caching, ...) also report their deviation from ``ours_bf16``
    on the same seed and prompt, measured on the decoded PNG.
    """

    name: str
    env: Mapping[str, str] = field(default_factory=dict)


# Opt-in lossy speed-ups: on by default on a GPU (fp8 needs one), with their deviation.
LOSSY_VARIANTS = (
    Variant("ours_fp8", {"ZIMAGE_FP8": "true"}),
    Variant("ours_step_cache", {"ZIMAGE_STEP_CACHE": "0.1"}),
)
# --ablation: each lossless speed-up switched off (or swapped) alone, to judge it by numbers.
ABLATION_VARIANTS = (
    Variant("ours_eager", {"ZIMAGE_COMPILE": "off"}),
    Variant("ours_compile_static", {"ZIMAGE_COMPILE_DYNAMIC": "false"}),
    Variant("ours_vae_eager", {"ZIMAGE_COMPILE_VAE": "off"}),
    Variant("ours_complex_rope", {"ZIMAGE_COMPILE_REAL_ROPE": "false"}),
    Variant("ours_cudagraphs", {"ZIMAGE_COMPILE_MODE": "reduce-overhead"}),
    Variant("ours_pad512", {"ZIMAGE_PROMPT_BUCKET_TOKENS": "0"}),
    Variant("ours_attn_cudnn", {"ZIMAGE_ATTENTION_BACKEND": "_native_cudnn"}),
    Variant("ours_attn_flash", {"ZIMAGE_ATTENTION_BACKEND": "_native_flash"}),
    Variant("ours_vae_nchw", {"ZIMAGE_VAE_CHANNELS_LAST": "off"}),
    Variant("ours_prompt_cache", {"ZIMAGE_PROMPT_CACHE_SIZE": "32"}),
    Variant("ours_no_prefetch", {"ZIMAGE_PREFETCH_PROMPTS": "off"}),
)


@dataclass(frozen=True)
class BenchConfig:
    model: str = "random:full"
    sizes: tuple[int, ...] = (1024, 512, 2048)  # the first is the primary size
    steps: int = 8
    warmup: int = 1
    iterations: int = 5
    concurrency: tuple[int, ...] = (1, 4, 8)
    variants: tuple[Variant, ...] = ()  # opt-in variants besides ours_bf16
    device: str = "auto"
    skip_stock: bool = False
    max_batch_size: int = 1
    peak_tflops: float = 800.0  # dense bf16 a GPU sustains (H100 SXM, measured)
    prompt: str = DEFAULT_PROMPT
    seed: int = 42
    data_dir: Path | None = None
    api_key: str | None = None
    ready_timeout_s: float = 1800.0
    overhead_requests: int = 500
    command: str = ""

    @property
    def primary(self) -> int:
        return self.sizes[0]

    def body(self, size: int, image_format: str = "webp") -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "width": size,
            "height": size,
            "steps": self.steps,
            "seed": self.seed,
            "guidance_scale": 1.0,
            "image_format": image_format,
            "quality": 90,
        }


def size_key(size: int) -> str:
    return f"{size}x{size}"


@contextlib.contextmanager
def _data_dir(config: BenchConfig) -> Iterator[Path]:
    if config.data_dir is not None:
        config.data_dir.mkdir(parents=True, exist_ok=True)
        yield config.data_dir
        return
    with tempfile.TemporaryDirectory(prefix="zimage-bench-") as tmp:
        yield Path(tmp)


def base_report(config: BenchConfig, device: str, benchmark: str) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "device": device_name(device),
        "date": today(),
        "command": config.command,
        "versions": package_versions(),
        "host": host_info(),
        "model": config.model,
        "settings": {
            "sizes": list(config.sizes),
            "steps": config.steps,
            "warmup": config.warmup,
            "iterations": config.iterations,
            "concurrency": list(config.concurrency),
            "max_batch_size": config.max_batch_size,
            "prompt": config.prompt,
            "seed": config.seed,
            "peak_tflops_assumed": config.peak_tflops,
        },
    }


def run_benchmark(
    config: BenchConfig, checkpoint: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Stock, stock with CFG off, ours and each opt-in variant; returns the report.

    ``checkpoint`` gets the report so far after each part (``complete`` false until the
    end), so that a run cut short by a time limit still leaves its figures behind.
    """
    device = resolve_device(config.device)
    if config.model == "random:full" and not device.startswith("cuda"):
        raise BenchError("random:full needs a GPU; on CPU use --model random:small or tiny.")
    report = {**base_report(config, device, "model"), "complete": False, "variants": {}}
    references: dict[str, np.ndarray] = {}
    with _data_dir(config) as data:
        model = ModelChoice(config.model, data)

        def save() -> None:
            if OURS in report["variants"]:
                _derive(config, model, report)
            if checkpoint is not None:
                checkpoint(report)

        if not config.skip_stock:
            _run_stock(config, model, device, report, references)
            save()
        _run_ours(config, model, device, Variant(OURS), report, references, save)
        save()
        for variant in config.variants:
            try:
                _run_ours(config, model, device, variant, report, references, save)
            except BenchError as exc:  # one variant that cannot run here does not sink the rest
                report["variants"][variant.name] = {"env": dict(variant.env), "error": str(exc)}
            save()
        report["complete"] = True
        save()
    return report


def _entry(per_size: dict[str, dict[str, Any]], primary: int) -> dict[str, Any]:
    """A variant's primary-size figures at the top, every size under ``sizes``."""
    return {**per_size[size_key(primary)], "sizes": per_size}


def _run_stock(
    config: BenchConfig,
    model: ModelChoice,
    device: str,
    report: dict[str, Any],
    references: dict[str, np.ndarray],
) -> None:
    runner = StockRunner(model, device)
    try:
        for name, guidance in (("stock", 1.0), ("stock_cfg_off", 0.0)):
            per_size = {
                size_key(size): summarize(
                    runner.timed(
                        config.prompt,
                        size,
                        config.steps,
                        guidance,
                        config.seed,
                        config.warmup,
                        config.iterations,
                    )
                )
                for size in config.sizes
            }
            report["variants"][name] = {**_entry(per_size, config.primary), "guidance": guidance}
        references["stock_cfg_off"] = runner.pixels(
            config.prompt, config.primary, config.steps, 0.0, config.seed
        )
    finally:
        runner.close()


def server_env(config: BenchConfig, data: Path, variant: Variant) -> dict[str, str]:
    env = {
        "ZIMAGE_DATA_DIR": str(data),
        # Warm (and compile) every size the run uses, the primary first.
        "ZIMAGE_WARMUP_SIZE": str(config.primary),
        "ZIMAGE_WARMUP_SIZES": ",".join(map(str, config.sizes[1:])),
        "ZIMAGE_WARMUP_STEPS": "1",
        # Every timed request repeats one prompt: the embedding cache would hide the text
        # encode. Off here; the ours_prompt_cache variant shows what it saves.
        "ZIMAGE_PROMPT_CACHE_SIZE": "0",
        "ZIMAGE_MAX_BATCH_SIZE": str(config.max_batch_size),
        "ZIMAGE_MAX_QUEUE": str(max(16, 2 * max(config.concurrency, default=1))),
        "ZIMAGE_REQUEST_TIMEOUT_S": "3600",
    }
    if not config.api_key:
        env["ZIMAGE_AUTH"] = "false"
    return {**env, **variant.env}


def _server(config: BenchConfig, model: ModelChoice, device: str, variant: Variant) -> BenchServer:
    args = [*model.server_args, "--device", "cuda" if device.startswith("cuda") else "cpu"]
    env = server_env(config, model.data_dir, variant)
    log = model.data_dir / f"server-{variant.name}.log"
    return BenchServer(args, env, log, config.ready_timeout_s)


def _run_ours(
    config: BenchConfig,
    model: ModelChoice,
    device: str,
    variant: Variant,
    report: dict[str, Any],
    references: dict[str, np.ndarray],
    save: Callable[[], None],
) -> None:
    """Latency per size, the deviation, then throughput; the figures are saved before the
    throughput runs (on the first H200 run a step's time ran out there, and took them)."""
    with _server(config, model, device, variant) as server:
        client = Client(server.url, config.api_key)
        try:
            per_size = {}
            for size in config.sizes:
                samples = client.timed(config.body(size), config.warmup, config.iterations)
                per_size[size_key(size)] = {
                    **summarize(samples),
                    "transformer_passes": samples[0].passes,
                    "prompt_tokens": samples[0].prompt_tokens,
                }
            entry = {**_entry(per_size, config.primary), "env": dict(variant.env)}
            pixels = client.pixels(config.body(config.primary))
            entry.update(_deviations(variant, pixels, references))
            if variant.name == OURS:
                references[OURS] = pixels
            report["variants"][variant.name] = entry
            save()
            throughput = _throughput(config, client)
            entry["throughput_img_s"] = {c: t["img_s"] for c, t in throughput.items()}
            if variant.name == OURS:
                report["throughput"] = throughput
            memory = client.device_memory_gib()
            if memory:
                entry["device_memory_gib"] = memory
        finally:
            client.close()


def _deviations(
    variant: Variant, pixels: np.ndarray, references: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Ours against stock (a sanity check: should be ~0); a variant against ours_bf16."""
    reference = "stock_cfg_off" if variant.name == OURS else OURS
    if reference not in references:
        return {}
    return {f"deviation_vs_{reference}": deviation(references[reference], pixels)}


def _throughput(config: BenchConfig, client: Client) -> dict[str, dict[str, Any]]:
    results = {}
    for concurrency in config.concurrency:
        requests = max(config.iterations, 2 * concurrency)
        rate, samples = client.throughput(config.body(config.primary), concurrency, requests)
        results[str(concurrency)] = {
            "img_s": rate,
            "requests": requests,
            "e2e_p50_s": summarize(samples)["e2e_p50_s"],
        }
    return results


def _derive(config: BenchConfig, model: ModelChoice, report: dict[str, Any]) -> None:
    """Speed-ups, images/s by concurrency and denoise TFLOP/s against the floor."""
    variants = report["variants"]
    ours = variants[OURS]["e2e_p50_s"]
    for name in ("stock", "stock_cfg_off"):
        if name in variants:
            suffix = "" if name == "stock" else "_cfg_off"
            report[f"speedup_vs_stock{suffix}"] = variants[name]["e2e_p50_s"] / ours
    for name, entry in variants.items():
        if name.startswith("ours_") and name != OURS and "e2e_p50_s" in entry:
            entry["speedup_vs_ours_bf16"] = ours / entry["e2e_p50_s"]
    report["throughput_img_s"] = {c: t["img_s"] for c, t in report.get("throughput", {}).items()}
    transformer = transformer_config(model)
    if transformer is not None:
        report["denoise"] = {
            key: _denoise_figures(transformer, int(key.split("x")[0]), figures, config.peak_tflops)
            for key, figures in variants[OURS]["sizes"].items()
        }


def _denoise_figures(
    transformer: Mapping[str, Any], size: int, figures: Mapping[str, Any], peak_tflops: float
) -> dict[str, float]:
    per_pass = transformer_flops(transformer, size, size, int(figures["prompt_tokens"]))
    total = per_pass * max(1, int(figures["transformer_passes"]))
    seconds = float(figures["stages_p50_s"].get("denoise", 0.0))
    return {
        "tflop_per_pass": per_pass / 1e12,
        "tflop_total": total / 1e12,
        "denoise_p50_s": seconds,
        "achieved_tflops": total / seconds / 1e12 if seconds else 0.0,
        "floor_s": total / (peak_tflops * 1e12),
    }


def transformer_config(model: ModelChoice) -> dict[str, Any] | None:
    """The transformer's constructor arguments, for the FLOP count (None: no transformer)."""
    from zimage_server.engine.random_model import SPECS

    if model.name in SPECS:
        return {"in_channels": 16, **SPECS[model.name].transformer}
    if model.name == "null":
        return None
    folder = model.tiny_dir if model.name == "tiny" else Path(_resolved_folder(model))
    config: dict[str, Any] = json.loads((folder / "transformer" / "config.json").read_text())
    return config


def _resolved_folder(model: ModelChoice) -> str:
    from zimage_server.core.config import Settings
    from zimage_server.engine.model_source import resolve_model

    return resolve_model(Settings(model=model.name, data_dir=model.data_dir)).path
