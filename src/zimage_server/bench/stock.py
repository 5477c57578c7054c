"""The baseline: the stock ``ZImagePipeline`` called as a naive server would call it.

``guidance_scale`` goes straight through (the API's default 1 means CFG on in diffusers,
so two transformer passes per step), prompts are padded to 512 tokens, attention is the
default, and the PIL image is encoded to WebP, as a server must. Runs in the benchmark's
own process, on the same device and dtype as the server's worker.
"""

from __future__ import annotations

import gc
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zimage_server.bench.stats import Sample

WEBP_QUALITY = 90  # the API's default
WEBP_METHOD = 4  # Pillow's default, what a naive server uses


@dataclass(frozen=True)
class ModelChoice:
    """What ``--model`` names, resolved for both the stock pipeline and the server."""

    name: str  # "tiny", "random:full", "random:small", "null", a folder or hub id
    data_dir: Path

    @property
    def server_args(self) -> list[str]:
        return ["--tiny"] if self.name == "tiny" else ["--model", self.name]

    @property
    def tiny_dir(self) -> Path:
        return self.data_dir / "models" / "tiny"  # where ``serve --tiny`` builds it too


def torch_dtype(torch: Any, device: str) -> Any:
    """bf16 on GPUs, fp32 on CPU: the same choice as the server's worker."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_pipeline(model: ModelChoice, device: str) -> Any:
    """The stock pipeline for ``model`` on ``device``."""
    import torch
    from diffusers import ZImagePipeline

    from zimage_server.engine.random_model import build_random_pipeline, is_random_model

    dtype = torch_dtype(torch, device)
    if is_random_model(model.name):
        pipe = build_random_pipeline(model.name, device, dtype)
    else:
        pipe = ZImagePipeline.from_pretrained(_folder(model), dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _folder(model: ModelChoice) -> str:
    if model.name == "tiny":
        from zimage_server.engine.tiny import build_tiny_model

        if not (model.tiny_dir / "model_index.json").exists():
            build_tiny_model(model.tiny_dir)
        return str(model.tiny_dir)
    from zimage_server.core.config import Settings
    from zimage_server.engine.model_source import resolve_model

    return resolve_model(Settings(model=model.name, data_dir=model.data_dir)).path


class StockRunner:
    """Times ``pipe(...)`` plus the WebP encode, per call."""

    def __init__(self, model: ModelChoice, device: str) -> None:
        import torch

        self.torch, self.device = torch, device
        self.pipe = load_pipeline(model, device)

    def render(self, prompt: str, size: int, steps: int, guidance: float, seed: int) -> Any:
        generator = self.torch.Generator(device=self.device).manual_seed(seed)
        return self.pipe(
            prompt=prompt,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
        ).images[0]

    def sample(self, prompt: str, size: int, steps: int, guidance: float, seed: int) -> Sample:
        start = time.perf_counter()
        image = self.render(prompt, size, steps, guidance, seed)  # PIL: already synchronised
        rendered = time.perf_counter()
        image.save(io.BytesIO(), "WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD)
        end = time.perf_counter()
        return Sample(end - start, {"pipeline": rendered - start, "image_encode": end - rendered})

    def timed(
        self, prompt: str, size: int, steps: int, guidance: float, seed: int, warmup: int, n: int
    ) -> list[Sample]:
        for _ in range(warmup):
            self.sample(prompt, size, steps, guidance, seed)
        return [self.sample(prompt, size, steps, guidance, seed) for _ in range(n)]

    def pixels(self, prompt: str, size: int, steps: int, guidance: float, seed: int) -> np.ndarray:
        return np.asarray(self.render(prompt, size, steps, guidance, seed).convert("RGB"))

    def close(self) -> None:
        """Free the model before the server loads its own copy (two may not fit)."""
        del self.pipe
        gc.collect()
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()
