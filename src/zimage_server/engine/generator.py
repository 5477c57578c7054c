"""The model behind one small interface: load, warm up, render a batch.

Runs only inside a worker process (it imports torch). ``DiffusersGenerator`` wraps the
stock ``ZImagePipeline`` and splits its call into text encode, denoise and VAE decode so
that each stage is timed and can be optimised on its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import (
    ZImageControlNetInpaintPipeline,
    ZImageControlNetModel,
    ZImageControlNetPipeline,
    ZImageImg2ImgPipeline,
    ZImageInpaintPipeline,
    ZImagePipeline,
)
from PIL import Image

from zimage_server.core.denoise import steps_run
from zimage_server.core.errors import Cancelled, StartupError, TaskNotConfigured
from zimage_server.engine.adapters import AdapterBank, AdapterError
from zimage_server.engine.preview import LatentPreviewer
from zimage_server.engine.protocol import (
    BatchDone,
    DeviceMemory,
    Preview,
    Prompt,
    RawImage,
    RenderBatch,
    RenderItem,
    WorkerSpec,
)
from zimage_server.engine.random_model import build_random_pipeline, is_random_model
from zimage_server.engine.speedups import apply_speedups, uncompile, use_compile_cache
from zimage_server.engine.text import PromptEncoder

log = logging.getLogger("zimage.worker")
ProgressFn = Callable[[str, int, int], None]
StepFn = Callable[[int, int, tuple[Preview, ...]], None]


def _overflowed(batch: RenderBatch) -> Exception:
    """A render whose values overflowed: the request's adapters (a 400, refunded) when it
    has any, else the server's fault (a 500, refunded)."""
    if batch.loras:
        names = ", ".join(f"'{lora.name}' at {lora.scale:g}" for lora in batch.loras)
        return AdapterError(
            f"the render overflowed (NaN or infinite values) with the LoRA adapters {names}: "
            "lower a scale or leave an adapter out"
        )
    return GenerationOverflow(
        "the render overflowed (NaN or infinite values): nothing was delivered or billed"
    )


class GenerationOverflow(RuntimeError):
    """The model's numbers overflowed on a render with no adapter to blame."""


def diffusers_guidance(guidance_scale: float) -> float:
    """Map the API's guidance convention (1 = off) to diffusers' (0 = off).

    ``ZImagePipeline`` computes ``pos + g * (pos - neg)`` and runs CFG for any g > 0, so
    the API's default 1 passed straight through would double the work and change the
    image. API g <= 1 means a single transformer pass per step.
    """
    return guidance_scale - 1.0 if guidance_scale > 1.0 else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Rendered:
    """One pipeline call's output, before it becomes a ``BatchDone``."""

    pixels: Any  # uint8 array (batch, height, width, 3)
    timings: dict[str, float]
    transformer_passes: int  # images through the transformer, summed over steps
    prompt_tokens: list[int]
    prompt_sources: list[str]  # encoded | cache | prefetch, per prompt


class DiffusersGenerator:
    """``ZImagePipeline`` on one device, with stage timings and a pass counter."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.device = spec.device
        self.speedups = spec.speedups
        self.pipe: Any = None
        self.text: PromptEncoder | None = None
        self.step_cache: Any = None  # CacheState when step caching is on
        self.compiled = False
        self.compile_error: str | None = None
        self._side_stream: Any = None
        self._passes = 0
        self._previewer: LatentPreviewer | None = None
        self._preview_s = 0.0  # this render's preview time, summed over steps
        self.adapters: AdapterBank | None = None
        self._task_pipes: dict[str, Any] = {}
        self.controlnet: Any = None  # ZImageControlNetModel when ZIMAGE_CONTROLNET is set

    @property
    def dtype_name(self) -> str:
        """The transformer's dtype as it is (said at ready: after warm-up, which once cast
        it by accident), or as it will be before the model is loaded."""
        if self.pipe is not None:
            return str(self.pipe.transformer.dtype).removeprefix("torch.")
        if self.spec.worker.dtype != "auto":
            return self.spec.worker.dtype
        return "bfloat16" if self.device.startswith("cuda") else "float32"

    def load(self, progress: ProgressFn) -> None:
        if self.device.startswith("cuda"):
            # synchronize() and empty_cache() act on the current device: cuda:N, not GPU 0.
            torch.cuda.set_device(torch.device(self.device))
        progress("loading the model code", 1, 3)
        use_compile_cache(self.spec.compile_cache_dir)
        dtype = getattr(torch, self.dtype_name)
        if is_random_model(self.spec.model_path):
            progress("building random weights on " + self.device, 2, 3)
            pipe = build_random_pipeline(self.spec.model_path, self.device, dtype)
        else:
            progress("loading weights", 2, 3)
            pipe = ZImagePipeline.from_pretrained(self.spec.model_path, dtype=dtype)
        if self.spec.controlnet_path:
            self.controlnet = ZImageControlNetModel.from_pretrained(
                self.spec.controlnet_path, dtype=dtype, local_files_only=True
            ).to(self.device)
        progress("moving to " + self.device, 3, 3)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        pipe.transformer.register_forward_pre_hook(self._count_passes)
        self.pipe = pipe
        if self.spec.loras.max_loras > 0:
            self.adapters = AdapterBank(pipe, self.spec.loras)
            if self.speedups.enabled(self.speedups.compile, self.device):
                self.adapters.make_slots()  # compiled graphs must contain them from the start
        self._speed_up(pipe)

    def _speed_up(self, pipe: Any) -> None:
        speedups, device = self.speedups, self.device
        applied = apply_speedups(pipe, speedups, device)
        self.compiled = speedups.enabled(speedups.compile, device)
        if speedups.step_cache > 0:
            from zimage_server.engine.step_cache import install_step_cache

            self.step_cache = install_step_cache(pipe.transformer, speedups.step_cache)
            applied.append(f"step_cache={speedups.step_cache}")
        self.text = PromptEncoder(
            pipe.tokenizer,
            pipe.text_encoder,
            speedups.prompt_bucket_tokens,
            speedups.prompt_cache_size,
        )
        log.info("speed-ups on %s: %s", device, ", ".join(applied))

    def _count_passes(self, _module: Any, args: tuple[Any, ...]) -> None:
        self._passes += len(args[0])

    def warmup(self) -> None:
        """Render each warm-up size once; compiled, also with CFG (a batch of two)."""
        settings = self.spec.worker
        sizes = dict.fromkeys((settings.warmup_size, *settings.warmup_sizes))
        for i, size in enumerate(sizes):
            for guidance in (1.0, 2.0) if self.compiled and i == 0 else (1.0,):
                batch = RenderBatch("warmup", (), size, size, settings.warmup_steps, guidance)
                self._run(batch, [Prompt("", "warm-up")], [0], _no_steps, lambda: False)
        if self.compiled and self.adapters is not None:
            size = settings.warmup_size
            batch = RenderBatch("warmup", (), size, size, settings.warmup_steps, 1.0)
            prompts, noop = [Prompt("", "warm-up")], _no_steps
            self.adapters.warm(lambda: self._run(batch, prompts, [0], noop, lambda: False))
        self._warm_tasks()

    def _warm_tasks(self) -> None:
        """Build every task's pipeline, and render one ControlNet batch (a grey control
        image) when its weights are set: no first request of a task pays for either. A
        ControlNet that loads but does not fit the model fails here, at start."""
        for task in TASK_PIPELINES:
            if self.controlnet is not None or not task.startswith("controlnet"):
                self._prebuild(task)
        if self.controlnet is None:
            return
        settings = self.spec.worker
        size = settings.warmup_size
        grey = RenderItem("warm-up", "warm-up", 0, control=bytes([128]) * (size * size * 3))
        steps = settings.warmup_steps
        batch = RenderBatch(
            "warmup", (grey,), size, size, steps, 1.0, task="controlnet", control_scale=0.75
        )
        try:
            self._run(batch, [Prompt("", "warm-up")], [0], _no_steps, lambda: False)
        except Exception as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            raise StartupError(
                f"ZIMAGE_CONTROLNET: {self.spec.controlnet_path} does not fit this model "
                f"(its warm-up render failed: {type(exc).__name__}: {exc})"
            ) from exc

    def generate(
        self, batch: RenderBatch, on_step: StepFn, is_cancelled: Callable[[], bool]
    ) -> BatchDone:
        prompts = [Prompt(item.tenant, item.prompt) for item in batch.items]
        seeds = [item.seed for item in batch.items]
        switch = self._adapters().apply(batch.loras) if batch.loras or self.adapters else 0.0
        out = self._run(batch, prompts, seeds, on_step, is_cancelled)
        if batch.loras:
            out.timings["lora_load"] = switch
        images = tuple(
            RawImage(item.job_id, batch.width, batch.height, out.pixels[i].tobytes())
            for i, item in enumerate(batch.items)
        )
        return BatchDone(
            batch.batch_id,
            images,
            out.timings,
            out.transformer_passes,
            tuple(out.prompt_tokens),
            tuple(out.prompt_sources),
            self.adapters.report() if self.adapters is not None else None,
            self.device_memory(),
        )

    def device_memory(self) -> DeviceMemory | None:
        """The GPU's memory now, and the peak since the last call (which resets it)."""
        if not self.device.startswith("cuda"):
            return None
        device = torch.device(self.device)
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return DeviceMemory(
            allocated=torch.cuda.memory_allocated(device),
            reserved=torch.cuda.memory_reserved(device),
            peak=peak,
            total=torch.cuda.get_device_properties(device).total_memory,
        )

    def prefetch(self, prompts: list[Prompt]) -> None:
        """Encode queued prompts now (another thread); on a GPU, on a side stream.

        Embeddings made on the side stream are marked as used by the main one, so their
        memory is not reused while the denoise that reads them is still queued.
        """
        text, device = self._text(), self.device
        if not device.startswith("cuda"):
            with torch.inference_mode():
                text.prefetch(prompts, lambda _embeddings: None)
            return
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        stream, main = self._side_stream, torch.cuda.default_stream(device)

        def publish(embeddings: list[Any]) -> None:
            for embedding in embeddings:
                embedding.record_stream(main)
            stream.synchronize()

        with torch.cuda.stream(stream), torch.inference_mode():
            text.prefetch(prompts, publish)

    def _adapters(self) -> AdapterBank:
        if self.adapters is None:
            raise AdapterError("LoRA adapters are off on this server (ZIMAGE_MAX_LORAS=0)")
        return self.adapters

    def _text(self) -> PromptEncoder:
        if self.text is None:
            raise RuntimeError("the generator is not loaded")
        return self.text

    def _run(
        self,
        batch: RenderBatch,
        prompts: list[Prompt],
        seeds: list[int],
        on_step: StepFn,
        is_cancelled: Callable[[], bool],
    ) -> Rendered:
        """Render; if the compiled path fails (not OOM, not a cancel), fall back to eager.

        A compiler bug on some GPU/driver/torch mix must cost speed, not the service.
        """
        try:
            return self._render(batch, prompts, seeds, on_step, is_cancelled)
        except Exception as exc:
            if not self.compiled or isinstance(exc, Cancelled | torch.OutOfMemoryError):
                raise
            self.compiled = False
            self.compile_error = f"{type(exc).__name__}: {exc}"
            modules = uncompile(self.pipe.transformer, self.pipe.vae)
            log.exception("compiled render failed; %d modules back to eager", modules)
        return self._render(batch, prompts, seeds, on_step, is_cancelled)

    def _render(
        self,
        batch: RenderBatch,
        prompts: list[Prompt],
        seeds: list[int],
        on_step: StepFn,
        is_cancelled: Callable[[], bool],
    ) -> Rendered:
        text = self._text()
        guidance = diffusers_guidance(batch.guidance_scale)
        timings: dict[str, float] = {}
        built = self._build_pipeline(batch.task)
        self._passes, self._preview_s = 0, 0.0
        with torch.inference_mode():
            start = time.perf_counter()
            positive = text.encode(prompts)
            sources = list(text.sources)
            negative = text.negatives(len(prompts)) if guidance > 0 else []
            timings["text_encode"] = self._lap(start)
            latents = self._denoise(
                batch, positive, negative, guidance, seeds, on_step, is_cancelled
            )
            timings["denoise"] = self._lap(start, sum(timings.values()))
            pixels = keep_unmasked(self._decode(latents, batch), batch)
            timings["vae_decode"] = self._lap(start, sum(timings.values()))
        if self._preview_s:  # inside denoise: reported, not added to the stages' sum
            timings["preview"] = self._preview_s
        if built:  # before the stages: shows a task the warm-up did not prepare
            timings["pipeline_build"] = built
        passes = self._passes
        if self.step_cache is not None:
            passes -= self.step_cache.skipped * len(seeds) * (2 if guidance > 0 else 1)
        return Rendered(
            pixels=pixels,
            timings=timings,
            transformer_passes=passes,
            prompt_tokens=[int(p.shape[0]) for p in positive],
            prompt_sources=sources,
        )

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
        pipe = self.pipe
        device = pipe._execution_device
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        delay = self.spec.worker.debug_step_delay_s
        if self.step_cache is not None:  # the steps that run: fewer for an input image
            # Never skip under a ControlNet: diffusers adds the control residuals after
            # each block, outside the cached ones, so a reused residual would add the last
            # step's control on top of this step's (double strength on skipped steps).
            skipping = not batch.task.startswith("controlnet")
            self.step_cache.begin(steps_run(batch.steps, batch.strength), skipping)
        wanted = [
            (index, item.job_id, item.preview_size)
            for index, item in enumerate(batch.items)
            if item.preview_size > 0
        ]

        def step_end(_pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if delay:
                time.sleep(delay)
            if is_cancelled():
                raise Cancelled("every image of the batch was cancelled")
            total = _pipe.num_timesteps  # fewer than batch.steps for an input image
            on_step(step + 1, total, self._previews(kwargs["latents"], wanted, batch))
            return {}

        return self._pipeline(batch.task)(
            prompt_embeds=positive,
            negative_prompt_embeds=negative if guidance > 0 else None,
            height=batch.height,
            width=batch.width,
            num_inference_steps=batch.steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="latent",
            callback_on_step_end=step_end,
            **task_inputs(batch),
        ).images

    def _prebuild(self, task: str) -> None:
        """Build a task's pipeline ahead of its first request. One that refuses these
        weights (a first-generation ControlNet has no inpainting) is left to fail on the
        requests for its task alone, as without a warm-up."""
        try:
            self._pipeline(task)
        except ValueError as exc:
            log.warning("%s is not available with these weights: %s", task, exc)

    def _build_pipeline(self, task: str) -> float:
        """Seconds spent building the task's pipeline now; 0 when it was built before."""
        if task == "text-to-image" or task in self._task_pipes:
            return 0.0
        began = time.perf_counter()
        self._pipeline(task)
        return time.perf_counter() - began

    def _pipeline(self, task: str) -> Any:
        """The task's diffusers pipeline over the loaded components (``from_pipe``: the
        same modules, so no second copy of the weights, and adapters, hooks and compiled
        regions apply to every task)."""
        if task == "text-to-image":
            return self.pipe
        if task not in self._task_pipes:
            kind, extra = TASK_PIPELINES[task], {}
            if task.startswith("controlnet"):
                if self.controlnet is None:
                    raise TaskNotConfigured(
                        "ControlNet is off on this worker: set ZIMAGE_CONTROLNET to a "
                        "ZImageControlNetModel folder or hub id on every server process."
                    )
                # The pipeline lends the transformer's embedders and refiners to the
                # ControlNet (``from_transformer``): shared modules, not copies.
                extra["controlnet"] = self.controlnet
            # dtype given: from_pipe casts every shared module to it, float32 by default,
            # which turned a bf16 model into fp32 at warm-up (5-7x slower, seen on an H200).
            pipe = kind.from_pipe(self.pipe, dtype=self.pipe.transformer.dtype, **extra)
            pipe.set_progress_bar_config(disable=True)
            self._task_pipes[task] = pipe
        return self._task_pipes[task]

    def _previews(
        self, latents: Any, wanted: list[tuple[int, str, int]], batch: RenderBatch
    ) -> tuple[Preview, ...]:
        """This step's previews for the items that asked (none: no work at all)."""
        if not wanted:
            return ()
        if self._previewer is None:
            self._previewer = LatentPreviewer(latents.device)
        previews = self._previewer.previews(latents, wanted, (batch.width, batch.height))
        self._preview_s += previews[0].compute_s
        return previews

    def _decode(self, latents: Any, batch: RenderBatch) -> Any:
        """VAE decode, then the stock post-processing (denormalise, round to uint8).

        Values that overflowed (NaN, inf) would round to a black or noisy image delivered
        and billed as a success; the check is read after the copy that waits anyway.
        """
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        if self.speedups.enabled(self.speedups.vae_channels_last, self.device):
            latents = latents.to(memory_format=torch.channels_last)
        image = vae.decode(latents, return_dict=False)[0]
        finite = torch.isfinite(image).all()
        image = (image.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        pixels = image.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        if not bool(finite):
            raise _overflowed(batch)
        return pixels

    def _lap(self, start: float, before: float = 0.0) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start - before


TASK_PIPELINES: dict[str, Any] = {
    "img2img": ZImageImg2ImgPipeline,
    "inpaint": ZImageInpaintPipeline,
    "controlnet": ZImageControlNetPipeline,
    "controlnet-inpaint": ZImageControlNetInpaintPipeline,
}
INPAINT_TASKS = ("inpaint", "controlnet-inpaint")


def task_inputs(batch: RenderBatch) -> dict[str, Any]:
    """Each item's input images, as the task's pipeline takes them (the ControlNet ones
    start from noise: no strength)."""
    if batch.task == "text-to-image":
        return {}
    size = (batch.width, batch.height)
    inputs: dict[str, Any] = {}
    if batch.task.startswith("controlnet"):
        inputs["control_image"] = [
            Image.frombytes("RGB", size, item.control) for item in batch.items
        ]
        inputs["controlnet_conditioning_scale"] = batch.control_scale
    else:
        inputs["strength"] = batch.strength
    if batch.task != "controlnet":
        inputs["image"] = [Image.frombytes("RGB", size, item.image) for item in batch.items]
    if batch.task in INPAINT_TASKS:
        inputs["mask_image"] = [Image.frombytes("L", size, item.mask) for item in batch.items]
    return inputs


def keep_unmasked(pixels: Any, batch: RenderBatch) -> Any:
    """Inpainting: the input's own pixels where the mask keeps them. The pipeline blends in
    latent space (a 16-pixel grid, through the VAE), or, with ControlNet, only conditions
    on the kept pixels; this makes "kept" exact."""
    if batch.task not in INPAINT_TASKS:
        return pixels
    shape = (batch.height, batch.width)
    for i, item in enumerate(batch.items):
        keep = np.frombuffer(item.mask, np.uint8).reshape(shape) < 128
        original = np.frombuffer(item.image, np.uint8).reshape((*shape, 3))
        pixels[i][keep] = original[keep]
    return pixels


def _no_steps(_step: int, _total: int, _previews: tuple[Preview, ...]) -> None:
    """Warm-up reports no progress."""
