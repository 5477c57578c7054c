"""The model behind one small interface: load, warm up, render a batch.

Runs only inside a worker process (it imports torch). ``DiffusersGenerator`` wraps the
stock ``ZImagePipeline`` and splits its call into text encode, denoise and VAE decode so
that each stage is timed and can be optimised on its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from zimage_server.engine.protocol import BatchDone, RawImage, RenderBatch
from zimage_server.engine.random_model import build_random_pipeline, is_random_model
from zimage_server.engine.speedups import (
    Speedups,
    apply_speedups,
    uncompile,
    use_compile_cache,
)

log = logging.getLogger("zimage.worker")
ProgressFn = Callable[[str, int, int], None]
StepFn = Callable[[int, int], None]


class Cancelled(Exception):
    """Every image of the batch was cancelled; raised between denoising steps."""


def diffusers_guidance(guidance_scale: float) -> float:
    """Map the API's guidance convention (1 = off) to diffusers' (0 = off).

    ``ZImagePipeline`` computes ``pos + g * (pos - neg)`` and runs CFG for any g > 0, so
    the API's default 1 passed straight through would double the work and change the
    image. API g <= 1 means a single transformer pass per step.
    """
    return guidance_scale - 1.0 if guidance_scale > 1.0 else 0.0


class ImageGenerator(Protocol):
    @property
    def dtype_name(self) -> str: ...

    def load(self, progress: ProgressFn) -> None: ...

    def warmup(self) -> None: ...

    def generate(
        self, batch: RenderBatch, on_step: StepFn, is_cancelled: Callable[[], bool]
    ) -> BatchDone: ...

    def prefetch(self, prompts: list[str]) -> None: ...


@dataclass(frozen=True)
class GeneratorConfig:
    model_path: str
    device: str  # "cpu", "cuda", "cuda:1"
    warmup_size: int = 1024
    warmup_steps: int = 2
    step_delay_s: float = 0.0
    faults: bool = False  # honour [[fault:...]] markers in prompts (tests, chaos drills)
    speedups: Speedups = field(default_factory=Speedups)
    warmup_sizes: tuple[int, ...] = ()  # more sizes to warm up (and compile) at start


def make_generator(config: GeneratorConfig) -> ImageGenerator:
    """The null generator for ``--model null``; the diffusers pipeline otherwise."""
    from zimage_server.engine.null import NULL_MODEL, NullGenerator

    if config.model_path == NULL_MODEL:
        return NullGenerator()
    return DiffusersGenerator(config)


class DiffusersGenerator:
    """``ZImagePipeline`` on one device, with stage timings and a pass counter."""

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.pipe: Any = None
        self.torch: Any = None
        self.text: Any = None  # PromptEncoder
        self.step_cache: Any = None  # CacheState when step caching is on
        self.compiled = False
        self.compile_error: str | None = None
        self._side_stream: Any = None
        self._sources: list[str] = []
        self._passes = 0

    @property
    def dtype_name(self) -> str:
        return "bfloat16" if self.config.device.startswith("cuda") else "float32"

    def load(self, progress: ProgressFn) -> None:
        progress("importing torch and diffusers", 1, 3)
        use_compile_cache(self.config.speedups.compile_cache_dir)
        import torch
        from diffusers import ZImagePipeline

        self.torch = torch
        dtype = getattr(torch, self.dtype_name)
        if is_random_model(self.config.model_path):
            progress("building random weights on " + self.config.device, 2, 3)
            pipe = build_random_pipeline(self.config.model_path, self.config.device, dtype)
        else:
            progress("loading weights", 2, 3)
            pipe = ZImagePipeline.from_pretrained(self.config.model_path, dtype=dtype)
        progress("moving to " + self.config.device, 3, 3)
        pipe.to(self.config.device)
        pipe.set_progress_bar_config(disable=True)
        pipe.transformer.register_forward_pre_hook(self._count_passes)
        self.pipe = pipe
        self._speed_up(pipe)

    def _speed_up(self, pipe: Any) -> None:
        from zimage_server.engine.text import PromptEncoder

        speedups, device = self.config.speedups, self.config.device
        applied = apply_speedups(pipe, speedups, device)
        self.compiled = speedups.enabled(speedups.compile, device)
        if speedups.step_cache > 0:
            from zimage_server.engine.step_cache import install_step_cache

            self.step_cache = install_step_cache(pipe.transformer, speedups.step_cache)
            applied.append(f"step_cache={speedups.step_cache}")
        self.text = PromptEncoder(
            pipe.tokenizer, pipe.text_encoder, speedups.prompt_bucket, speedups.prompt_cache
        )
        log.info("speed-ups on %s: %s", device, ", ".join(applied))

    def _count_passes(self, _module: Any, args: tuple[Any, ...]) -> None:
        self._passes += len(args[0])

    def warmup(self) -> None:
        """Render each warm-up size once; compiled, also with CFG (a batch of two)."""
        sizes = dict.fromkeys((self.config.warmup_size, *self.config.warmup_sizes))
        with_cfg = self.compiled
        for i, size in enumerate(sizes):
            for guidance in (1.0, 2.0) if with_cfg and i == 0 else (1.0,):
                batch = RenderBatch("warmup", (), size, size, self.config.warmup_steps, guidance)
                self._run(batch, ["warm-up"], [0], lambda _s, _t: None, lambda: False)

    def generate(
        self, batch: RenderBatch, on_step: StepFn, is_cancelled: Callable[[], bool]
    ) -> BatchDone:
        prompts = [item.prompt for item in batch.items]
        seeds = [item.seed for item in batch.items]
        pixels, timings, passes, tokens = self._run(batch, prompts, seeds, on_step, is_cancelled)
        images = tuple(
            RawImage(item.job_id, batch.width, batch.height, pixels[i].tobytes())
            for i, item in enumerate(batch.items)
        )
        sources = tuple(self._sources)
        return BatchDone(batch.batch_id, images, timings, passes, tuple(tokens), sources)

    def prefetch(self, prompts: list[str]) -> None:
        """Encode queued prompts now (another thread); on a GPU, on a side stream.

        Embeddings made on the side stream are marked as used by the main one, so their
        memory is not reused while the denoise that reads them is still queued.
        """
        torch, device = self.torch, self.config.device
        if not device.startswith("cuda"):
            with torch.inference_mode():
                self.text.prefetch(prompts, lambda _embeddings: None)
            return
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device)
        stream, main = self._side_stream, torch.cuda.default_stream(device)

        def publish(embeddings: list[Any]) -> None:
            for embedding in embeddings:
                embedding.record_stream(main)
            stream.synchronize()

        with torch.cuda.stream(stream), torch.inference_mode():
            self.text.prefetch(prompts, publish)

    def _run(
        self,
        batch: RenderBatch,
        prompts: list[str],
        seeds: list[int],
        on_step: StepFn,
        is_cancelled: Callable[[], bool],
    ) -> tuple[Any, dict[str, float], int, list[int]]:
        """Render; if the compiled path fails (not OOM, not a cancel), fall back to eager.

        A compiler bug on some GPU/driver/torch mix must cost speed, not the service.
        """
        try:
            return self._render(batch, prompts, seeds, on_step, is_cancelled)
        except Exception as exc:
            if not self.compiled or isinstance(exc, Cancelled) or "OutOfMemory" in repr(exc):
                raise
            self.compiled = False
            self.compile_error = f"{type(exc).__name__}: {exc}"
            modules = uncompile(self.pipe.transformer, self.pipe.vae)
            log.exception("compiled render failed; %d modules back to eager", modules)
        return self._render(batch, prompts, seeds, on_step, is_cancelled)

    def _render(
        self,
        batch: RenderBatch,
        prompts: list[str],
        seeds: list[int],
        on_step: StepFn,
        is_cancelled: Callable[[], bool],
    ) -> tuple[Any, dict[str, float], int, list[int]]:
        torch = self.torch
        guidance = diffusers_guidance(batch.guidance_scale)
        timings: dict[str, float] = {}
        self._passes = 0
        with torch.inference_mode():
            start = time.perf_counter()
            positive = self.text.encode(prompts)
            self._sources = list(self.text.sources)
            negative = self.text.negatives(len(prompts)) if guidance > 0 else []
            timings["text_encode"] = self._lap(start)
            latents = self._denoise(
                batch, positive, negative, guidance, seeds, on_step, is_cancelled
            )
            timings["denoise"] = self._lap(start, sum(timings.values()))
            pixels = self._decode(latents)
            timings["vae_decode"] = self._lap(start, sum(timings.values()))
        passes = self._passes
        if self.step_cache is not None:
            passes -= self.step_cache.skipped * len(seeds) * (2 if guidance > 0 else 1)
        return pixels, timings, passes, [int(p.shape[0]) for p in positive]

    def _denoise(
        self,
        batch: RenderBatch,
        positive: list[Any],
        negative: list[Any],
        guidance: float,
        seeds: list[int],
        on_step: StepFn,
        is_cancelled: Callable[[], bool],
    ) -> Any:
        torch, pipe = self.torch, self.pipe
        device = pipe._execution_device
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        delay = self.config.step_delay_s
        if self.step_cache is not None:
            self.step_cache.begin(batch.steps)

        def step_end(_pipe: Any, step: int, _t: Any, _kwargs: dict[str, Any]) -> dict[str, Any]:
            if delay:
                time.sleep(delay)
            if is_cancelled():
                raise Cancelled
            on_step(step + 1, batch.steps)
            return {}

        return pipe(
            prompt_embeds=positive,
            negative_prompt_embeds=negative if guidance > 0 else None,
            height=batch.height,
            width=batch.width,
            num_inference_steps=batch.steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="latent",
            callback_on_step_end=step_end,
        ).images

    def _decode(self, latents: Any) -> Any:
        """VAE decode, then the stock post-processing (denormalise, round to uint8)."""
        torch, vae = self.torch, self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        if self.config.speedups.enabled(self.config.speedups.vae_channels_last, self.config.device):
            latents = latents.to(memory_format=torch.channels_last)
        image = vae.decode(latents, return_dict=False)[0]
        image = (image.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        return image.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def _lap(self, start: float, before: float = 0.0) -> float:
        if self.config.device.startswith("cuda"):
            self.torch.cuda.synchronize()
        return time.perf_counter() - start - before
