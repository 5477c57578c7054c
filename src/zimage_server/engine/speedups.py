"""The engine's speed-ups, each one switchable so the benchmark can judge it alone.

Lossless (on by default where they pay): prompts padded to a bucket instead of 512
tokens (``engine/text.py``), the attention backend, regional ``torch.compile`` of the
repeated transformer block with a persistent compile cache, VAE decode in channels-last.
Lossy (off by default, because random weights cannot show what they do to an image):
fp8 matmuls through torchao, and step caching (``engine/step_cache.py``).

Switched by ``SpeedupSettings`` (``core/config.py``), which the worker gets in its
``WorkerSpec``. Imported in the worker only, but torch still waits inside the functions:
the null generator's worker never needs it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from zimage_server.core.config import SpeedupSettings

log = logging.getLogger("zimage.worker")

FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first with fp8 tensor cores
FP8_MODULES = ("layers.", "noise_refiner.", "context_refiner.")  # the repeated blocks
RECOMPILE_LIMIT = 64  # graphs per block: batch of 1 / many, with / without a mask, ...


class SpeedupError(RuntimeError):
    """A requested speed-up cannot run here; the message says why and what to change."""


def use_compile_cache(cache_dir: str | None) -> None:
    """Point Inductor and Triton at a folder that outlives the process (fast restarts).

    Assigned, not defaulted: Inductor writes its /tmp default into the environment the
    first time it asks, and both read the variables again at each compile.
    """
    if not cache_dir:
        return
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")


def attention_backend(name: str, device: str) -> str:
    """``auto``: FlashAttention-3 where its wheel is installed, else PyTorch's SDPA choice."""
    if name != "auto":
        return name
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn_interface"):
        return "_flash_3"
    return "native"


def apply_speedups(pipe: Any, speedups: SpeedupSettings, device: str) -> list[str]:
    """Switch on what ``speedups`` asks for; returns a line per speed-up for the log."""
    applied = []
    compiled = speedups.enabled(speedups.compile, device)
    if compiled and speedups.compile_real_rope:
        from zimage_server.engine.rope import use_real_rope

        applied.append("rope=real" if use_real_rope(pipe.transformer) else "rope=complex")
    backend = attention_backend(speedups.attention_backend, device)
    if backend != "native":
        pipe.transformer.set_attention_backend(backend)
    applied.append(f"attention={backend}")
    if speedups.fp8:
        quantize_fp8(pipe.transformer, device)
        applied.append("fp8")
    if speedups.enabled(speedups.vae_channels_last, device):
        import torch

        pipe.vae.to(memory_format=torch.channels_last)
        applied.append("vae=channels_last")
    if compiled:
        compile_blocks(pipe.transformer, speedups.compile_mode, speedups.compile_dynamic)
        shapes = "dynamic" if speedups.compile_dynamic else "static"
        applied.append(f"compile=blocks({speedups.compile_mode}, {shapes})")
        if speedups.enabled(speedups.compile_vae, device):
            pipe.vae.decoder.compile(mode=speedups.compile_mode, dynamic=speedups.compile_dynamic)
            applied.append("compile=vae_decoder")
    applied.append(f"prompt_bucket={speedups.prompt_bucket_tokens or 'stock-512'}")
    return applied


def compile_blocks(transformer: Any, mode: str, dynamic: bool = True) -> None:
    """Regional compile: each repeated block shares one compiled graph (minutes -> seconds).

    Dynamic shapes from the start by default: the sequence length moves with the image
    size and the prompt's bucket, and static graphs recompile (seconds) on the first
    request of each new shape; static ones may run faster, so the benchmark measures both.
    Batch size 1 still gets its own graph (dynamo specialises on 1), which is why the
    warm-up also renders a CFG batch of two.
    """
    import torch

    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    torch._dynamo.config.accumulated_recompile_limit = RECOMPILE_LIMIT * 4
    transformer.compile_repeated_blocks(fullgraph=True, dynamic=dynamic, mode=mode)


def uncompile(*modules: Any) -> int:
    """Back to eager: drop every compiled call (the fallback when compiling fails)."""
    import torch

    count = 0
    for module in modules:
        for sub in module.modules():
            if getattr(sub, "_compiled_call_impl", None) is not None:
                sub._compiled_call_impl = None
                count += 1
    torch._dynamo.reset()
    return count


def fp8_capable(device: str) -> str | None:
    """Why fp8 cannot run on ``device``, or None when it can."""
    if not device.startswith("cuda"):
        return "fp8 needs an NVIDIA GPU with compute capability 8.9+ (Ada, Hopper); got CPU"
    import torch

    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < FP8_MIN_CAPABILITY:
        return f"fp8 needs compute capability 8.9+; {device} has {capability[0]}.{capability[1]}"
    if importlib.util.find_spec("torchao") is None:
        return "fp8 needs torchao: pip install 'zimage-server[fp8]'"
    return None


def quantize_fp8(transformer: Any, device: str) -> None:
    """Dynamic fp8 activations x fp8 weights (per-row scales) in the repeated blocks."""
    reason = fp8_capable(device)
    if reason:
        raise SpeedupError(reason)
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        PerRow,
        quantize_,
    )

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    quantize_(transformer, config, filter_fn=fp8_wanted)


def fp8_wanted(module: Any, name: str) -> bool:
    """The block linears fp8 takes; never a LoRA slot's ``lora_A``/``lora_B`` (hot swaps
    copy bf16 weights into them in place, and a rank-64 matmul gains nothing)."""
    import torch

    return (
        isinstance(module, torch.nn.Linear)
        and name.startswith(FP8_MODULES)
        and ".lora_" not in name
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )
