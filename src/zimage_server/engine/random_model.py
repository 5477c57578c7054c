"""Z-Image pipelines with random weights, built in memory on the target device.

``random:full`` has the real architecture (6B transformer, Qwen3-4B text encoder, FLUX.1
VAE): speed does not depend on weight values, so it measures latency and memory without
the checkpoint. ``random:small`` is the same code path scaled down (widths / 10, two
layers) so that CPU tests exercise it. Weights are seeded and never zero; they say
nothing about image quality.

Modules are constructed under ``torch.device(device)`` with the target dtype as the
default, so a full-size model is allocated once, on the accelerator, in bf16: it never
materialises on the CPU first. Torch is imported lazily: the API process imports the
names only.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

RANDOM_PREFIX = "random:"
WIDTH_DIVISOR = 10  # random:small divides widths (not head dims) by this
TEXT_HEAD_DIVISOR = 8  # ... the text heads by this (32:8 GQA becomes 4:1, head dim 128)
VAE_DIVISOR = 8  # ... and the VAE's channels by this

# The published configurations of Z-Image-Turbo's components.
FULL_TRANSFORMER: dict[str, Any] = {
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "cap_feat_dim": 2560,
    "axes_dims": [32, 48, 48],
}
FULL_TEXT_ENCODER: dict[str, Any] = {  # Qwen3-4B
    "vocab_size": 151936,
    "hidden_size": 2560,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "tie_word_embeddings": True,
}
FULL_VAE: dict[str, Any] = {  # FLUX.1
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}
SCHEDULER_SHIFT = 3.0


@dataclass(frozen=True)
class RandomModelSpec:
    """Constructor arguments of each component (the tokenizer is the tiny model's)."""

    transformer: dict[str, Any] = field(default_factory=lambda: dict(FULL_TRANSFORMER))
    text_encoder: dict[str, Any] = field(default_factory=lambda: dict(FULL_TEXT_ENCODER))
    vae: dict[str, Any] = field(default_factory=lambda: dict(FULL_VAE))


def _small(full: RandomModelSpec) -> RandomModelSpec:
    """Widths / 10 and two layers; head dims, RoPE axes and ratios stay as in full."""
    t, e, v = full.transformer, full.text_encoder, full.vae
    text_hidden = e["hidden_size"] // WIDTH_DIVISOR
    transformer = {
        **t,
        "dim": t["dim"] // WIDTH_DIVISOR,
        "n_layers": 2,
        "n_refiner_layers": 1,
        "n_heads": t["n_heads"] // WIDTH_DIVISOR,
        "n_kv_heads": t["n_kv_heads"] // WIDTH_DIVISOR,
        "cap_feat_dim": text_hidden,
    }
    text_encoder = {
        **e,
        "vocab_size": None,  # the tokenizer's size: a 151936-row table is pointless here
        "hidden_size": text_hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": e["num_attention_heads"] // TEXT_HEAD_DIVISOR,
        "num_key_value_heads": e["num_key_value_heads"] // TEXT_HEAD_DIVISOR,
        "intermediate_size": e["intermediate_size"] // WIDTH_DIVISOR,
    }
    vae = {
        **v,
        "block_out_channels": tuple(c // VAE_DIVISOR for c in v["block_out_channels"]),
        "layers_per_block": 1,
        "norm_num_groups": v["norm_num_groups"] // VAE_DIVISOR,
    }
    return replace(full, transformer=transformer, text_encoder=text_encoder, vae=vae)


SPECS: dict[str, RandomModelSpec] = {
    "random:full": RandomModelSpec(),
    "random:small": _small(RandomModelSpec()),
}


def is_random_model(name: str) -> bool:
    return name.startswith(RANDOM_PREFIX)


def random_spec(name: str) -> RandomModelSpec:
    """The spec for ``name``; ``ValueError`` names the choices when it is unknown."""
    if name not in SPECS:
        raise ValueError(f"Unknown random model '{name}'; choose one of {', '.join(SPECS)}.")
    return SPECS[name]


@contextlib.contextmanager
def _default_dtype(dtype: Any) -> Iterator[None]:
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def randomize_(module: Any, generator: Any) -> None:
    """Seeded, non-zero weights of a sane scale, in place, on the module's device.

    Matrices and convolutions get N(0, 1/fan_in) so activations stay O(1) through depth;
    biases N(0, 0.02); norm scales U(0.9, 1.1). Zero-initialised parameters (pad tokens,
    adaLN gates) become non-zero too, so no branch is skipped or constant.
    """
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.02, generator=generator)
            else:
                param.uniform_(0.9, 1.1, generator=generator)


def load_tokenizer() -> Any:
    """The tiny model's byte-level BPE tokenizer: every prompt tokenizes, any script."""
    from transformers import AutoTokenizer

    from zimage_server.engine.tiny import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer(Path(tmp))
        return AutoTokenizer.from_pretrained(Path(tmp) / "tokenizer")


def build_components(name: str, device: str, dtype: Any, tokenizer_size: int) -> tuple[Any, ...]:
    """Transformer, text encoder and VAE of ``name``, allocated on ``device`` in ``dtype``.

    Weights are whatever the constructors leave (``device="meta"`` allocates nothing:
    handy to check a configuration's size).
    """
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    spec = random_spec(name)
    text_config = {**spec.text_encoder}
    text_config["vocab_size"] = text_config["vocab_size"] or tokenizer_size
    with _default_dtype(dtype), torch.device(device):
        return (
            ZImageTransformer2DModel(**spec.transformer),
            Qwen3Model(Qwen3Config(**text_config)),
            AutoencoderKL(**spec.vae),
        )


def build_random_pipeline(name: str, device: str, dtype: Any, seed: int = 0) -> Any:
    """A ``ZImagePipeline`` of ``name`` with seeded random weights, built on ``device``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    tokenizer = load_tokenizer()
    transformer, text_encoder, vae = build_components(name, device, dtype, len(tokenizer))
    generator = torch.Generator(device=device).manual_seed(seed)
    for module in (transformer, text_encoder, vae):
        randomize_(module, generator)
        module.eval()
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
