"""Rotary embeddings in real arithmetic, so that a compiled block fuses them.

Z-Image applies RoPE as a complex multiply (``view_as_complex``), and Inductor does not
generate code for complex operators: inside a compiled block each rotation falls back to
separate eager kernels in float32. Here the embedder's table is handed to the blocks as
(cos, sin) pairs and the rotation is written as ``(a + ib)(c + id)`` in real numbers,
which Inductor fuses with the casts around it. Same math, same result (a test compares).
Used only with regional compile; in eager the complex multiply is the faster form.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor


class RealRopeEmbedder:
    """Wraps the model's ``RopeEmbedder``: the same table, viewed as real (..., pairs, 2)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(self.inner(ids))


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``x`` (batch, seq, heads, dim) rotated by ``freqs`` (batch, seq, dim/2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = freqs[..., 0].unsqueeze(2), freqs[..., 1].unsqueeze(2)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(3).type_as(x)


class RealRopeAttnProcessor(ZSingleStreamAttnProcessor):  # type: ignore[misc]
    """Z-Image's single-stream attention with the rotation above; otherwise unchanged."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query, key, value = (
            proj(hidden_states).unflatten(-1, (attn.heads, -1))
            for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = rotate(query, freqs_cis), rotate(key, freqs_cis)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]  # (batch, 1, 1, keys)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(query.dtype)
        projected: torch.Tensor = attn.to_out[0](out)
        if len(attn.to_out) > 1:  # dropout, an identity at inference
            projected = attn.to_out[1](projected)
        return projected


def use_real_rope(transformer: Any) -> bool:
    """Swap in the real-arithmetic rotation; False (and nothing changed) on another layout."""
    attentions = [m for m in transformer.modules() if hasattr(m, "set_processor")]
    stock = all(type(m.processor) is ZSingleStreamAttnProcessor for m in attentions)
    if not attentions or not stock or not hasattr(transformer, "rope_embedder"):
        return False
    for module in attentions:
        module.set_processor(RealRopeAttnProcessor())
    transformer.rope_embedder = RealRopeEmbedder(transformer.rope_embedder)
    return True
