"""Messages between the API process and a worker process.

Plain frozen dataclasses, pickled over a ``multiprocessing`` pipe. ``WorkerSpec`` is the
worker's whole configuration, passed at spawn. The API side then sends commands
(``RenderBatch``, ``Cancel``, ``Prefetch``, ``Shutdown``); the worker answers with events.
Images travel as raw RGB bytes at render size: encoding happens in the API process,
off the accelerator's critical path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from zimage_server.core.config import LoraSettings, SpeedupSettings, WorkerSettings
from zimage_server.engine.pixels import Pixels


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSpec:
    """Everything a worker process needs, handed to it once at spawn."""

    name: str  # worker-0, worker-1, ...
    model_path: str  # a diffusers folder, ``null`` or ``random:...``
    device: str  # "cpu", "cuda:0", ...
    worker: WorkerSettings
    speedups: SpeedupSettings
    compile_cache_dir: str | None = None
    build_tiny_at: str | None = None  # build the tiny model here first if it is missing
    loras: LoraSettings = field(default_factory=LoraSettings)
    controlnet_path: str | None = None  # a ZImageControlNetModel folder; None: no ControlNet

    @property
    def prefetches(self) -> bool:
        """Whether this worker encodes hinted prompts ahead (others would drop hints)."""
        return self.speedups.enabled(self.speedups.prefetch_prompts, self.device)


@dataclass(frozen=True, slots=True, kw_only=True)
class LoraRef:
    """One adapter of a render, resolved by the API process to a local safetensors file.

    ``identity`` changes when the file does (path, size, mtime): the worker's cache key.
    """

    name: str  # as the request named it, for messages
    path: str
    identity: str
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class RenderItem:
    """One image of a batch."""

    job_id: str
    prompt: str
    seed: int
    request_id: str = ""  # the HTTP request's id, for the worker's logs
    tenant: str = ""  # whose prompt: cached embeddings are shared only within a tenant
    preview_size: int = 0  # longer side of a per-step preview, in pixels; 0: no previews
    image: bytes = b""  # img2img/inpaint: RGB uint8 at the batch's size (compact, no PNG)
    mask: bytes = b""  # inpaint: L uint8 at the batch's size, 255 = repaint
    control: bytes = b""  # controlnet: the control image, RGB uint8 at the batch's size


@dataclass(frozen=True, slots=True)
class RenderBatch:
    """Images that share size, steps and guidance, rendered in one pipeline call."""

    batch_id: str
    items: tuple[RenderItem, ...]
    width: int  # a multiple of 16
    height: int  # a multiple of 16
    steps: int
    guidance_scale: float  # the API's convention: <= 1 means no guidance
    loras: tuple[LoraRef, ...] = ()  # applied to the whole batch; () = none
    task: str = "text-to-image"  # or img2img, inpaint, controlnet, controlnet-inpaint
    strength: float = 1.0
    control_scale: float = 0.0  # controlnet: controlnet_conditioning_scale


@dataclass(frozen=True, slots=True)
class Cancel:
    job_id: str


class Prompt(NamedTuple):
    """A prompt and the tenant it belongs to: the key of cached prompt embeddings.

    Scoping the cache by tenant keeps its benefit (a client repeating its own prompts)
    without letting a response's ``text_encode`` time tell one API key whether another
    used an exact prompt."""

    tenant: str
    text: str


@dataclass(frozen=True, slots=True)
class Prefetch:
    """Prompts of renders queued behind the running batch: encode them meanwhile."""

    prompts: tuple[Prompt, ...]


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


Command = RenderBatch | Cancel | Prefetch | Shutdown


@dataclass(frozen=True, slots=True)
class LoadProgress:
    stage: str
    step: int
    total: int


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """A GPU's memory as the worker's PyTorch sees it, in bytes: what an operator needs to
    judge how close renders run to out-of-memory, and whether the weights are the size the
    dtype says (a bf16 model cast to fp32 holds twice as much)."""

    allocated: int  # held by tensors now: weights, cached LoRAs and prompts
    reserved: int  # held by PyTorch's caching allocator (no other process can use it)
    peak: int  # the most allocated since the last report (a batch, or load and warm-up)
    total: int  # the device's capacity


@dataclass(frozen=True, slots=True)
class Ready:
    device: str
    dtype: str
    load_s: float
    memory: DeviceMemory | None = None  # None on a CPU


@dataclass(frozen=True, slots=True)
class LoadFailed:
    error: str


@dataclass(frozen=True, slots=True)
class Preview:
    """One image's per-step preview: small uint8 RGB made from the latents (no VAE)."""

    job_id: str
    width: int
    height: int
    rgb: bytes
    compute_s: float  # on the device, for the whole batch's previews of this step


@dataclass(frozen=True, slots=True)
class StepProgress:
    batch_id: str
    step: int
    total: int
    previews: tuple[Preview, ...] = ()  # only for the items that asked for previews


@dataclass(frozen=True, slots=True)
class RawImage:
    job_id: str
    width: int
    height: int
    rgb: Pixels  # bytes from the worker; in the API, a lease on a shared-memory slot


@dataclass(frozen=True, slots=True)
class AdapterStats:
    """A worker's LoRA cache after a batch, for ``/metrics``: what it holds now, and what
    happened since its previous report (so a restarted worker never counts backwards)."""

    loaded: int
    memory_bytes: int  # device memory of the loaded adapters' weights
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_s: tuple[float, ...] = ()  # each miss: read, converted and moved to the device


@dataclass(frozen=True, slots=True)
class BatchDone:
    batch_id: str
    images: tuple[RawImage, ...]
    timings: dict[str, float] = field(default_factory=dict)
    # Images pushed through the transformer, summed over steps: one per image per step
    # without guidance, two with it. Counted by a forward hook on the real module.
    transformer_passes: int = 0
    prompt_tokens: tuple[int, ...] = ()
    # Where each prompt's embedding came from: "encoded", "cache" or "prefetch".
    prompt_sources: tuple[str, ...] = ()
    adapters: AdapterStats | None = None  # None: LoRAs are off on this worker
    memory: DeviceMemory | None = None  # None on a CPU


# "invalid": the request's input cannot be used with this model (an adapter that does not
# fit its layers); the API answers 400 and refunds. "unconfigured": this worker cannot
# serve the task (ControlNet without its weights); the API answers 404 and refunds.
FailureKind = Literal["cancelled", "oom", "error", "invalid", "unconfigured"]


@dataclass(frozen=True, slots=True)
class BatchFailed:
    batch_id: str
    kind: FailureKind
    message: str


Event = LoadProgress | Ready | LoadFailed | StepProgress | BatchDone | BatchFailed
