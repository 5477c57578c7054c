"""What switching LoRA adapters costs (``--lora-switch``).

``--loras`` adapters of rank ``--lora-rank`` are made with PEFT against the model's own
transformer layers (built on the meta device: shapes only, so the full 6B model costs no
memory here), filled with seeded random values and saved as diffusers safetensors into a
temporary ``ZIMAGE_LORA_DIR``. One server then takes, at each concurrency, plain requests
only, and requests that go round-robin over plain and every adapter, so that each batch
switches adapters: the worst case for the hot-swap slots. Reported side by side: p50/p95,
images/s, their ratios, and the ``timings.lora_load`` each LoRA request carried.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from zimage_server.bench.environment import resolve_device
from zimage_server.bench.runner import (
    BenchConfig,
    Variant,
    _data_dir,
    _server,
    base_report,
    size_key,
    transformer_config,
)
from zimage_server.bench.server import Client
from zimage_server.bench.stats import Sample, percentile
from zimage_server.bench.stock import ModelChoice

# The layers trainers usually adapt in Z-Image's blocks: attention and the feed-forward.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
DEFAULT_SLOT_RANK = 64  # the server's ZIMAGE_LORA_MAX_RANK default
Tagged = tuple[str, Sample]  # "plain" or the adapter's name, and the request's figures


def adapter_shapes(model: ModelChoice, rank: int) -> dict[str, tuple[int, ...]]:
    """PEFT's LoRA weight names and shapes for ``model``'s transformer (meta: no memory)."""
    import torch
    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    if model.name == "tiny":
        from zimage_server.bench.stock import _folder

        _folder(model)  # the tiny model is built here first; the server finds it
    config = transformer_config(model)
    if config is None:
        raise ValueError(f"model '{model.name}' has no transformer to adapt")
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel.from_config(config)
        lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS))
        transformer.add_adapter(lora)
    weights = get_peft_model_state_dict(transformer)
    return {key: tuple(value.shape) for key, value in weights.items()}


def build_adapters(
    model: ModelChoice, folder: Path, count: int, rank: int, seed: int, half: bool
) -> list[str]:
    """``count`` installed adapters (``folder/bench-<i>/``), their names."""
    import torch
    from diffusers import ZImagePipeline

    shapes = adapter_shapes(model, rank)
    dtype = torch.bfloat16 if half else torch.float32
    names = []
    for index in range(count):
        generator = torch.Generator().manual_seed(seed + index)
        weights = {key: _random(key, shape, generator).to(dtype) for key, shape in shapes.items()}
        name = f"bench-{index}"
        ZImagePipeline.save_lora_weights(folder / name, transformer_lora_layers=weights)
        names.append(name)
    return names


def _random(key: str, shape: tuple[int, ...], generator: Any) -> Any:
    """A: unit variance per output (1/sqrt(in)); B: small, so images change but stay sane."""
    import torch

    values = torch.randn(shape, generator=generator)
    return values / shape[1] ** 0.5 if ".lora_A." in key else values * 0.02


def run_lora_switch(config: BenchConfig, count: int, rank: int) -> dict[str, Any]:
    """Plain and round-robin LoRA traffic on one server, at each concurrency."""
    device = resolve_device(config.device)
    report = base_report(config, device, "lora")
    slot_rank = max(rank, DEFAULT_SLOT_RANK)
    with _data_dir(config) as data:
        model = ModelChoice(config.model, data)
        folder = data / "bench-loras"
        start = time.perf_counter()
        names = build_adapters(model, folder, count, rank, config.seed, device.startswith("cuda"))
        built_s, megabytes = time.perf_counter() - start, _megabytes(folder, names)
        env = {"ZIMAGE_LORA_DIR": str(folder), "ZIMAGE_LORA_MAX_RANK": str(slot_rank)}
        with _server(config, model, device, Variant("loras", env)) as server:
            client = Client(server.url, config.api_key)
            try:
                first = _first_loads(client, config, names)
                levels = {str(c): _level(client, config, names, c) for c in config.concurrency}
            finally:
                client.close()
    report["lora_switch"] = {
        "size": size_key(config.primary),
        "steps": config.steps,
        "adapters": count,
        "rank": rank,
        "slot_rank": slot_rank,
        "targets": list(TARGETS),
        "adapter_mb": megabytes,
        "build_s": built_s,
        "first_load_s": first,
        "concurrency": levels,
    }
    return report


def _megabytes(folder: Path, names: Sequence[str]) -> float:
    sizes = [f.stat().st_size for name in names for f in (folder / name).glob("*.safetensors")]
    return sum(sizes) / len(names) / 2**20 if names else 0.0


def _first_loads(client: Client, config: BenchConfig, names: Sequence[str]) -> list[float]:
    """Untimed warm-up, then each adapter's first request: read from disk, converted,
    swapped in (a cache miss); its ``lora_load`` is what a new adapter costs once."""
    body = config.body(config.primary)
    for _ in range(config.warmup):
        client.render(body)
    loads = []
    for name in names:
        sample, _ = client.render({**body, "loras": [{"path": name}]})
        loads.append(float(sample.stages.get("lora_load", 0.0)))
    return loads


def _level(
    client: Client, config: BenchConfig, names: Sequence[str], concurrency: int
) -> dict[str, Any]:
    """Plain only, then round-robin over plain + every adapter: the same count each."""
    cycle = ["plain", *names]
    rounds = max(config.iterations, -(-2 * concurrency // len(cycle)))
    plain_rate, plain = _traffic(client, config, ["plain"] * rounds * len(cycle), concurrency)
    mixed_rate, mixed = _traffic(client, config, cycle * rounds, concurrency)
    with_loras = [sample for tag, sample in mixed if tag != "plain"]
    loads = [float(sample.stages.get("lora_load", 0.0)) for sample in with_loras]
    plain_p50 = percentile([s.e2e_s for _, s in plain], 50)
    lora_p50 = percentile([s.e2e_s for s in with_loras], 50)
    return {
        "requests_each": len(mixed),
        "plain": _figures(plain_rate, [s for _, s in plain]),
        "mixed": _figures(mixed_rate, [s for _, s in mixed]),
        "mixed_lora_requests": _figures(0.0, with_loras),
        "mixed_plain_requests": _figures(0.0, [s for tag, s in mixed if tag == "plain"]),
        "lora_load_p50_s": percentile(loads, 50),
        "lora_load_p95_s": percentile(loads, 95),
        "lora_load_max_s": max(loads),
        "ratio_img_s": mixed_rate / plain_rate,
        "ratio_p50_lora_vs_plain": lora_p50 / plain_p50,
    }


def _figures(rate: float, samples: Sequence[Sample]) -> dict[str, float]:
    e2e = [sample.e2e_s for sample in samples]
    figures = {"e2e_p50_s": percentile(e2e, 50), "e2e_p95_s": percentile(e2e, 95)}
    return {"img_s": rate, **figures} if rate else figures


def _traffic(
    client: Client, config: BenchConfig, tags: Sequence[str], concurrency: int
) -> tuple[float, list[Tagged]]:
    """Send one request per tag from ``concurrency`` threads; images/s and each sample."""
    body, lock, samples = config.body(config.primary), threading.Lock(), []

    def one(index: int) -> None:
        sample, _ = client.render(_request(body, tags[index], config.seed + index))
        with lock:
            samples.append((tags[index], sample))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(len(tags))))
    return len(tags) / (time.perf_counter() - start), samples


def _request(body: Mapping[str, Any], tag: str, seed: int) -> dict[str, Any]:
    request = {**body, "seed": seed}
    if tag != "plain":
        request["loras"] = [{"path": tag}]
    return request
