"""``random:small``: the full model's code path, scaled down, rendered by the stock pipeline."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from zimage_server.engine.random_model import (
    FULL_TEXT_ENCODER,
    FULL_TRANSFORMER,
    FULL_VAE,
    SPECS,
    TEXT_HEAD_DIVISOR,
    VAE_DIVISOR,
    WIDTH_DIVISOR,
    build_components,
    build_random_pipeline,
    random_spec,
)


@pytest.fixture(scope="module")
def pipe() -> Any:
    return build_random_pipeline("random:small", "cpu", torch.float32, seed=3)


def test_full_spec_is_the_published_architecture() -> None:
    full = SPECS["random:full"]
    assert full.transformer == FULL_TRANSFORMER
    assert (full.transformer["dim"], full.transformer["n_layers"]) == (3840, 30)
    assert sum(full.transformer["axes_dims"]) == 3840 // 30  # RoPE axes fill a head
    text = full.text_encoder
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]) == (
        2560,
        36,
        151936,
    )
    assert (text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]) == (
        32,
        8,
        128,
    )
    assert full.vae["block_out_channels"] == (128, 256, 512, 512)
    assert full.vae["latent_channels"] == 16


def test_full_size_builds_to_the_real_parameter_counts() -> None:
    """On the meta device: the real classes accept the configs; nothing is allocated."""
    modules = build_components("random:full", "meta", torch.bfloat16, tokenizer_size=512)
    billions = [sum(p.numel() for p in m.parameters()) / 1e9 for m in modules]
    transformer, text_encoder, vae = billions
    assert 6.0 < transformer < 6.3  # "6B single-stream DiT"
    assert 3.9 < text_encoder < 4.1  # Qwen3-4B without its (tied) LM head
    assert 0.07 < vae < 0.09  # FLUX.1 VAE, ~84M
    assert all(p.dtype == torch.bfloat16 for m in modules for p in m.parameters())


def test_small_is_full_scaled_down() -> None:
    small, full = SPECS["random:small"].transformer, FULL_TRANSFORMER
    assert small["dim"] * WIDTH_DIVISOR == full["dim"]
    assert small["dim"] // small["n_heads"] == full["dim"] // full["n_heads"]  # head dim 128
    assert small["axes_dims"] == full["axes_dims"]
    text = SPECS["random:small"].text_encoder
    assert text["hidden_size"] * WIDTH_DIVISOR == FULL_TEXT_ENCODER["hidden_size"]
    assert text["num_attention_heads"] * TEXT_HEAD_DIVISOR == 32
    assert text["num_key_value_heads"] * TEXT_HEAD_DIVISOR == 8
    assert small["cap_feat_dim"] == text["hidden_size"]
    vae = SPECS["random:small"].vae
    assert (
        tuple(c * VAE_DIVISOR for c in vae["block_out_channels"]) == FULL_VAE["block_out_channels"]
    )


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="random:full, random:small"):
        random_spec("random:huge")


def test_weights_are_random_and_never_zero(pipe: Any) -> None:
    for component in ("transformer", "text_encoder", "vae"):
        for name, param in getattr(pipe, component).named_parameters():
            assert param.abs().sum() > 0, f"{component}.{name} is all zeros"
    assert pipe.transformer.config.dim == 384


def test_weights_depend_only_on_the_seed(pipe: Any) -> None:
    again = build_random_pipeline("random:small", "cpu", torch.float32, seed=3).transformer
    other = build_random_pipeline("random:small", "cpu", torch.float32, seed=4).transformer
    assert torch.equal(again.x_pad_token, pipe.transformer.x_pad_token)
    assert not torch.equal(other.x_pad_token, pipe.transformer.x_pad_token)


def test_stock_pipeline_renders_it(pipe: Any) -> None:
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a lighthouse at dawn",
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(1),
    ).images[0]
    pixels = np.asarray(image)
    assert image.size == (256, 256)
    assert pixels.std() > 5  # a real, varied image: neither blank nor NaN-black
