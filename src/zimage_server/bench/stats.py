"""Numbers the benchmark reports: percentiles, image deviation and transformer FLOPs.

Pure functions (numpy only), so they are unit-testable without a model or a server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SEQ_MULTIPLE = 32  # Z-Image pads image and caption token runs to multiples of 32
PATCH_PIXELS = 16  # VAE /8, then 2x2 patches: one image token per 16x16 pixels


@dataclass(frozen=True)
class Sample:
    """One timed request: end-to-end seconds and the per-stage seconds it reported."""

    e2e_s: float
    stages: Mapping[str, float] = field(default_factory=dict)
    passes: int = 0
    prompt_tokens: int = 0


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(samples: Sequence[Sample]) -> dict[str, Any]:
    """p50/p90 of end-to-end time and the median of each stage."""
    e2e = [s.e2e_s for s in samples]
    stages = sorted({name for s in samples for name in s.stages})
    return {
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p90_s": percentile(e2e, 90),
        "e2e_p99_s": percentile(e2e, 99),
        "iterations": len(samples),
        "stages_p50_s": {
            name: percentile([s.stages[name] for s in samples if name in s.stages], 50)
            for name in stages
        },
    }


def deviation(reference: np.ndarray, other: np.ndarray) -> dict[str, float | None]:
    """Max and mean absolute difference (0..255 levels) and PSNR in dB (None: identical)."""
    if reference.shape != other.shape:
        raise ValueError(f"image shapes differ: {reference.shape} vs {other.shape}")
    diff = np.abs(reference.astype(np.int16) - other.astype(np.int16)).astype(np.float64)
    mse = float(np.mean(diff**2))
    psnr = None if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "psnr_db": psnr}


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def block_flops(config: Mapping[str, Any], tokens: int) -> float:
    """FLOPs of one transformer block over ``tokens`` tokens (multiply-add = 2 FLOPs).

    Linears: 2 * params * tokens, with params = q + k + v + out + SwiGLU FFN
    (d^2 + 2 * d * kv_dim + d^2 + 3 * d * int(8d/3)). Attention: 4 * tokens^2 * d
    (QK^T and the weighted sum of V, each 2 * tokens^2 * head_dim per head). The per-block
    adaLN modulation acts once per image, not per token, and is left out.
    """
    dim, heads = int(config["dim"]), int(config["n_heads"])
    kv_dim = int(config.get("n_kv_heads", heads)) * (dim // heads)
    ffn = int(dim / 3 * 8)
    params = 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * ffn
    return 2.0 * params * tokens + 4.0 * tokens * tokens * dim


def transformer_flops(
    config: Mapping[str, Any], width: int, height: int, prompt_tokens: int
) -> float:
    """FLOPs of one transformer pass (one image, one step).

    ``n_layers`` main blocks see image + caption tokens; ``n_refiner_layers`` noise-refiner
    blocks see image tokens and as many context-refiner blocks see caption tokens. Plus the
    patch embedder, caption embedder and final layer (small).
    """
    image = round_up((width // PATCH_PIXELS) * (height // PATCH_PIXELS), SEQ_MULTIPLE)
    caption = round_up(max(prompt_tokens, 1), SEQ_MULTIPLE)
    refiners = int(config.get("n_refiner_layers", 2))
    dim, patch_in = int(config["dim"]), 4 * int(config.get("in_channels", 16))
    embed = 2.0 * (2 * patch_in * dim * image + int(config["cap_feat_dim"]) * dim * caption)
    return (
        int(config["n_layers"]) * block_flops(config, image + caption)
        + refiners * (block_flops(config, image) + block_flops(config, caption))
        + embed
    )
