"""Generation service: validated params in, encoded (and paid-for) image out. No HTTP here."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import AsyncIterator, Coroutine, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from zimage_server.accounts import Admission
from zimage_server.billing import Ledger, Pricing
from zimage_server.core.config import Settings
from zimage_server.core.errors import (
    DeadlineExceeded,
    InvalidRequest,
    StoreUnavailable,
    TaskNotConfigured,
    UnknownModel,
    ZImageError,
)
from zimage_server.engine import EngineLike, RenderSpec
from zimage_server.engine.protocol import LoraRef
from zimage_server.images.control import preprocess
from zimage_server.images.encode import MEDIA_TYPES, encode_image, round_up_16
from zimage_server.images.inputs import (
    ImageFetcher,
    InputImages,
    InputLimits,
    default_size,
    fit_control,
    is_transparent,
    load_image,
    mask_from_alpha,
    mask_from_luma,
    open_image,
    pack_png,
    to_render_size,
    to_rgb,
    unpack_png,
)
from zimage_server.images.loras import LoraCatalog
from zimage_server.protocol.segmind import (
    MODEL_SLUG,
    TASK_SLUGS,
    GenerationParams,
    ImageResponse,
    SubmitRequest,
    Task,
    json_value,
    validate_params,
    with_webhook,
)
from zimage_server.store import Outputs
from zimage_server.telemetry import Metrics

SEED_RANGE = 2**31  # server-picked seeds stay below 2^31: safe in int32 and JS numbers


@dataclass(frozen=True)
class Generated:
    """An encoded image plus what a client may want to know about how it was made."""

    data: bytes
    params: GenerationParams
    seed: int
    generation_time: float
    timings: dict[str, float] = field(default_factory=dict)
    transformer_passes: int = 0
    batch_size: int = 1
    prompt_tokens: int = 0
    worker: str = ""
    prompt_source: str = ""  # encoded | cache | prefetch
    output_id: str | None = None
    credits_consumed: int | None = None  # micro-credits; None when auth is off
    credits_remaining: int | None = None

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.params.image_format]

    def base64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")

    def response(self, image: str) -> ImageResponse:
        """The v1 JSON body, with ``image`` (the URL, or ``self.base64()``)."""
        p = self.params
        return ImageResponse(
            image=image,
            seed=self.seed,
            width=p.width,
            height=p.height,
            image_format=p.image_format,
            quality=p.quality,
            steps=p.steps,
            guidance_scale=p.guidance_scale,
            generation_time=round(self.generation_time, 4),
            timings={k: round(v, 6) for k, v in self.timings.items()},  # a cached key check is ~us
            transformer_passes=self.transformer_passes,
            prompt_tokens=self.prompt_tokens,
        )


@dataclass(frozen=True, slots=True)
class EditInputs:
    """An edit's decoded uploads and the task they make (``mask`` only for inpaint)."""

    task: Task
    image: Any  # PIL images: decoded, orientation applied
    mask: Any


def with_size(params: GenerationParams, inputs: InputImages | None) -> GenerationParams:
    """The params with the output size that the input images were fitted to."""
    if inputs is None or (params.width, params.height) == (inputs.width, inputs.height):
        return params
    return params.model_copy(update={"width": inputs.width, "height": inputs.height})


# Each task's input images: those it needs, and those it may also take.
TASK_IMAGES: dict[Task, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "text-to-image": ((), ()),
    "img2img": (("image",), ()),
    "inpaint": (("image", "mask_image"), ()),
    "controlnet": (("control_image",), ("image", "mask_image")),  # both: ControlNet inpaint
}
IMAGE_SLUGS = {
    "image": f"{MODEL_SLUG}-img2img",
    "mask_image": f"{MODEL_SLUG}-inpaint",
    "control_image": f"{MODEL_SLUG}-controlnet",
}
CONTROL_FIELDS = ("controlnet_conditioning_scale", "control_type")


def check_task_fields(params: GenerationParams, model: str) -> None:
    """The input images that the slug's task needs, and only those; and its strength."""
    needs, may = TASK_IMAGES[params.task]
    for name in IMAGE_SLUGS:
        given = getattr(params, name) is not None
        if name in needs and not given:
            raise InvalidRequest(
                f"Missing required field '{name}': '{model}' needs it (an http(s) URL, a data "
                "URI or base64 of a PNG, JPEG or WebP image).",
                field=name,
            )
        if given and name not in needs + may:
            raise InvalidRequest(
                f"Invalid '{name}': '{model}' takes no {name}; use '{IMAGE_SLUGS[name]}'.",
                field=name,
            )
    if params.task == "controlnet":
        check_controlnet_fields(params, model)
    else:
        check_strength(params)
        extra = [name for name in CONTROL_FIELDS if name in params.model_fields_set]
        if extra:
            raise InvalidRequest(
                f"Invalid '{extra[0]}': '{model}' takes no {extra[0]}; use "
                f"'{IMAGE_SLUGS['control_image']}'.",
                field=extra[0],
            )


def check_controlnet_fields(params: GenerationParams, model: str) -> None:
    """ControlNet inpainting takes ``image`` and ``mask_image`` together; no strength (its
    pipelines start from noise)."""
    if (params.image is None) != (params.mask_image is None):
        missing = "mask_image" if params.image is not None else "image"
        raise InvalidRequest(
            f"Missing required field '{missing}': ControlNet inpainting on '{model}' takes "
            "'image' and 'mask_image' together (or neither, for plain ControlNet).",
            field=missing,
        )
    if params.strength is not None:
        raise InvalidRequest(
            f"Invalid 'strength': '{model}' takes no strength (its pipelines start from noise; "
            "'controlnet_conditioning_scale' sets how much the control image steers).",
            field="strength",
        )


def engine_task(params: GenerationParams) -> str:
    """The pipeline a render runs: the slug's task, or ControlNet inpainting when a
    ControlNet request brings a mask."""
    if params.task == "controlnet" and params.mask_image is not None:
        return "controlnet-inpaint"
    return params.task


def check_strength(params: GenerationParams) -> None:
    """A strength that leaves at least one step (diffusers runs one for any above 0)."""
    if params.steps_run < 1:
        raise InvalidRequest(
            "Invalid 'strength': must be a number above 0 and at most 1 (0 runs no step; "
            f"got {params.effective_strength:g}).",
            field="strength",
        )


def stored_form(submit: SubmitRequest, inputs: InputImages) -> SubmitRequest:
    """A v2 job's params with its images as they render (``stored_inputs`` reads them):
    decoded once, at submit, so a run never fetches a URL or decodes an upload again."""
    size = (round_up_16(inputs.width), round_up_16(inputs.height))
    update: dict[str, Any] = {
        "width": inputs.width,
        "height": inputs.height,
        "image": pack_png(inputs.image, "RGB", size),
        "mask_image": pack_png(inputs.mask, "L", size),
        "control_image": pack_png(inputs.control, "RGB", size),
        "control_type": "none",  # already applied
    }
    return submit.model_copy(update=update)


async def _all_or_none(renders: Iterable[Coroutine[Any, Any, Generated]]) -> list[Generated]:
    """Run the renders together; the first failure cancels the rest and is raised as is."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(render) for render in renders]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def tenant_of(admission: Admission) -> str:
    """Who a request belongs to: its key's id, or "anonymous" when auth is off."""
    return str(admission.principal.key_id) if admission.principal else "anonymous"


def pick_seed(params: GenerationParams) -> int:
    return params.seed if params.seed >= 0 else secrets.randbelow(SEED_RANGE)


@dataclass
class _Bill:
    """What ``_billed`` tells its block: the balance after the hold, and how long the key
    check and the ledger's commits took (``timings``: what a key adds to a request)."""

    remaining: int | None
    timings: dict[str, float]
    holding: asyncio.Future[int] | None = None  # the hold's commit (None: no key)

    def timed(self, generated: Generated) -> Generated:
        return replace(generated, timings={**generated.timings, **self.timings})

    async def confirmed(self) -> None:
        """Wait for the hold (raising its refusal): before work that outlives a refusal."""
        if self.holding is not None:
            await asyncio.shield(self.holding)


class _StopIfRefused:
    """Cancels the request's task when its overlapped hold is refused while the render
    runs (the GPU and the queue place go to requests that can pay), then makes the
    refusal, not a cancellation, the request's answer."""

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task
        self.armed = False  # inside the block: what a cancel would stop
        self.fired = False

    def refused(self, holding: asyncio.Future[int]) -> None:
        if holding.cancelled() or holding.exception() is None or not self.armed:
            return
        if self.task is not None and not self.task.done():
            self.fired = True
            self.task.cancel()

    def answer(self, exc: BaseException, holding: asyncio.Future[int]) -> BaseException:
        """``exc``, or the hold's refusal if our cancel caused it (and nothing else did,
        such as the client leaving)."""
        if not (self.fired and isinstance(exc, asyncio.CancelledError) and self.task):
            return exc
        if self.task.uncancel() > 0:
            return exc
        return holding.exception() or exc


class GenerationService:
    def __init__(
        self,
        settings: Settings,
        engine: EngineLike,
        outputs: Outputs,
        ledger: Ledger,
        pricing: Pricing,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.outputs = outputs
        self.ledger = ledger
        self.pricing = pricing
        self.metrics = metrics
        self.loras = LoraCatalog(settings)
        self.fetcher = ImageFetcher(settings, InputLimits.from_settings(settings))

    def served_tasks(self) -> frozenset[Task]:
        """The tasks this process renders: all, but ControlNet only with its weights. Its
        v2 submits and its claims of other processes' jobs keep to these."""
        tasks = frozenset(TASK_SLUGS.values())
        return tasks if self.settings.controlnet is not None else tasks - {"controlnet"}

    def check_model(self, slug: str) -> None:
        if slug not in TASK_SLUGS:
            served = ", ".join(f"'{name}'" for name in TASK_SLUGS)
            raise UnknownModel(f"Unknown model '{slug[:80]}'. This server serves {served}.")
        if TASK_SLUGS[slug] not in self.served_tasks():
            raise TaskNotConfigured(
                f"'{slug}' needs ControlNet weights, and this server was started without "
                "them: the operator sets ZIMAGE_CONTROLNET to a folder (or a hub id in the "
                "local Hugging Face cache) holding a ZImageControlNetModel in diffusers "
                "format, such as the Z-Image-Turbo-Fun-Controlnet-Union weights, and "
                "restarts the server."
            )

    async def validate(self, body: object, model: str = MODEL_SLUG) -> GenerationParams:
        """A v1 body as the route received it (parsed JSON, or raw bytes), for the task
        that the slug ``model`` names."""
        params = validate_params(json_value(body))
        params = params.model_copy(update={"task": TASK_SLUGS[model]})
        self.check_prompt(params.prompt)
        check_task_fields(params, model)
        await self.check_loras(params)
        return params

    async def validate_submit(self, body: object, model: str = MODEL_SLUG) -> SubmitRequest:
        """A v2 body as the route received it (parsed JSON, or raw bytes). An input-image
        task's images are fetched and decoded now (a bad one is a 400, before anything is
        held) and stored in the job's params as they will render: PNGs at render size,
        the control image already pre-processed, the output size exact."""
        data = json_value(body)
        params = await self.validate(data, model)
        inputs = await self.load_inputs(params)  # sees which fields the body set
        submit = with_webhook(params, data)
        if inputs is None:
            return submit
        return await asyncio.to_thread(stored_form, submit, inputs)

    def stored_inputs(self, params: GenerationParams) -> InputImages | None:
        """A v2 job's images, back from the PNGs ``validate_submit`` stored."""
        if params.task == "text-to-image":
            return None
        size = (round_up_16(params.width), round_up_16(params.height))
        return InputImages(
            params.width,
            params.height,
            unpack_png(params.image, "RGB", size, "image"),
            unpack_png(params.mask_image, "L", size, "mask_image"),
            unpack_png(params.control_image, "RGB", size, "control_image"),
        )

    async def load_inputs(self, params: GenerationParams) -> InputImages | None:
        """Fetch and decode the request's images (400 naming the field for anything
        refused), before anything is billed; None for text-to-image. The pixel work runs
        in a thread: a 4096-pixel input takes ~0.6 s that the event loop must not wait."""
        if params.task == "text-to-image":
            return None
        loaded = {}
        for name in IMAGE_SLUGS:
            value = getattr(params, name)
            if value is not None:
                loaded[name] = await load_image(value, name, self.fetcher)
        return await asyncio.to_thread(self._prepare, params, loaded)

    def _prepare(self, params: GenerationParams, loaded: dict[str, Any]) -> InputImages:
        """Decoded images at render size: the size is the request's, or else that of the
        control image (ControlNet) or of the input image."""
        mask = loaded.get("mask_image")
        mask = mask_from_luma(mask) if mask is not None else None
        control = loaded.get("control_image")
        if control is None:
            return self.fit_inputs(params, to_rgb(loaded["image"]), mask, "mask_image")
        control = to_rgb(control)
        size_given = bool({"width", "height"} & params.model_fields_set)
        size = (params.width, params.height) if size_given else default_size(control.size)
        render = (round_up_16(size[0]), round_up_16(size[1]))
        fitted = preprocess(fit_control(control, render), params.control_type).tobytes()
        if "image" not in loaded:
            return InputImages(size[0], size[1], b"", b"", fitted)
        images = to_render_size(to_rgb(loaded["image"]), mask, size, render, "mask_image")
        return replace(images, control=fitted)

    async def edit_inputs(self, image: bytes, mask: bytes | None) -> EditInputs:
        """OpenAI's edit uploads: the mask's transparent pixels are edited; without a mask,
        an image with transparent pixels is its own mask, and one without is img2img."""
        return await asyncio.to_thread(self._edit_inputs, image, mask)

    def _edit_inputs(self, image: bytes, mask: bytes | None) -> EditInputs:
        limits = self.fetcher.limits
        picture = open_image(image, "image", limits)
        if mask is not None:
            mask_picture = open_image(mask, "mask", limits)
            return EditInputs("inpaint", to_rgb(picture), mask_from_alpha(mask_picture, "mask"))
        if is_transparent(picture):
            return EditInputs("inpaint", to_rgb(picture), mask_from_alpha(picture, "image"))
        return EditInputs("img2img", to_rgb(picture), None)

    def fit_inputs(
        self,
        params: GenerationParams,
        image: Any,
        mask: Any,
        mask_field: str,
        size_given: bool | None = None,
    ) -> InputImages:
        """The images at the request's render size: its width and height if it gave them,
        else the input's own size (scaled into 256..2048)."""
        if size_given is None:
            size_given = bool({"width", "height"} & params.model_fields_set)
        size = (params.width, params.height) if size_given else default_size(image.size)
        render = (round_up_16(size[0]), round_up_16(size[1]))
        return to_render_size(image, mask, size, render, mask_field)

    def check_prompt(self, prompt: str) -> None:
        """The server's own limit, on top of the contract's (operators set it)."""
        if len(prompt) > self.settings.max_prompt_chars:
            raise InvalidRequest(
                f"Invalid 'prompt': at most {self.settings.max_prompt_chars} characters "
                f"(got {len(prompt)}).",
                field="prompt",
            )

    async def check_loras(self, params: GenerationParams) -> tuple[LoraRef, ...]:
        """``resolve_loras`` after fetching any adapter named by URL that is not on disk."""
        self.loras.check_count(params.loras)
        if not params.loras:
            return ()  # most requests: no thread hop (~0.1 ms of every request's overhead)
        with self.loras.holding(params.loras):  # fetching the second must not evict the first
            for index, entry in enumerate(params.loras):
                await self.loras.fetch(index, entry)
            return await asyncio.to_thread(self.resolve_loras, params)

    def resolve_loras(self, params: GenerationParams) -> tuple[LoraRef, ...]:
        """The request's adapters as local files, each checked (a 400 names the first
        that fails); run at validation, before anything is held, and again at render."""
        self.loras.check_count(params.loras)
        return tuple(
            self.loras.resolve_local(index, entry) for index, entry in enumerate(params.loras)
        )

    def price(self, params: GenerationParams, inputs: InputImages | None = None) -> int:
        """By size and the steps that run (an input image's strength skips the first)."""
        width, height = (inputs.width, inputs.height) if inputs else (params.width, params.height)
        return self.pricing.price(
            width,
            height,
            params.steps_run,
            loras=bool(params.loras),
            controlnet=params.task == "controlnet",
        )

    async def generate(
        self,
        params: GenerationParams,
        admission: Admission,
        store: bool = False,
        timeout: float | None = None,
        stream_id: str | None = None,
        inputs: InputImages | None = None,
    ) -> Generated:
        """Hold the price, render, encode (and store); anything short of success refunds."""
        params = with_size(params, inputs)
        price = self.price(params)
        timeout = timeout or self.settings.request_timeout_s
        # A stream's events go out as it renders: its hold must come first.
        async with self._billed(admission, price, timeout, overlap=not stream_id) as bill:
            generated = await self.render(
                params,
                pick_seed(params),
                timeout,
                tenant=tenant_of(admission),
                stream_id=stream_id,
                inputs=inputs,
            )
            if store:
                await bill.confirmed()  # no image stored for a request its hold refused
                output_id = await asyncio.to_thread(
                    self.outputs.save, generated.data, params.image_format
                )
                generated = replace(generated, output_id=output_id)
        generated = bill.timed(generated)
        self._record(admission, [generated])
        if admission.principal is None:
            return generated
        return replace(generated, credits_consumed=price, credits_remaining=bill.remaining)

    def _record(self, admission: Admission, images: list[Generated]) -> None:
        key = admission.principal.prefix if admission.principal else None
        for generated in images:
            self.metrics.record_render(
                key, generated.timings, generated.batch_size, prompt_source=generated.prompt_source
            )

    async def generate_many(
        self,
        batch: list[GenerationParams],
        admission: Admission,
        store: bool = False,
        inputs: InputImages | None = None,
    ) -> list[Generated]:
        """Several images billed together: all are charged, or none. They are queued at
        once, so the engine's batcher can render them as one batch; the first failure
        cancels the others (a task group), so no sibling renders on unpaid. ``inputs``:
        the one input image (and mask) that every image starts from."""
        batch = [with_size(params, inputs) for params in batch]
        price = sum(self.price(params) for params in batch)
        timeout = self.settings.request_timeout_s
        tenant = tenant_of(admission)
        async with self._billed(admission, price, timeout) as bill:
            results = await _all_or_none(
                self._render_one(params, timeout, store, tenant, inputs) for params in batch
            )
        results = [bill.timed(generated) for generated in results]
        self._record(admission, results)
        if admission.principal is None:
            return results
        share = [self.price(g.params) for g in results]
        return [
            replace(g, credits_consumed=p, credits_remaining=bill.remaining)
            for g, p in zip(results, share, strict=True)
        ]

    async def _render_one(
        self,
        params: GenerationParams,
        timeout: float,
        store: bool,
        tenant: str,
        inputs: InputImages | None,
    ) -> Generated:
        seed = pick_seed(params)
        generated = await self.render(params, seed, timeout, tenant=tenant, inputs=inputs)
        if not store:
            return generated
        output_id = await asyncio.to_thread(self.outputs.save, generated.data, params.image_format)
        return replace(generated, output_id=output_id)

    @asynccontextmanager
    async def _billed(
        self, admission: Admission, price: int, timeout: float, overlap: bool = True
    ) -> AsyncIterator[_Bill]:
        """Hold ``price`` for the block; keep it if the block succeeds, else give it back.

        The hold is pending until settled and expires ``hold_grace_s`` after the deadline,
        so if this process dies (or the database refuses the refund) the sweep returns it.
        """
        if not self.outputs.room_recently_seen():
            await asyncio.to_thread(self.outputs.check_space)  # 507 before anything is held
        if admission.principal is None:
            yield _Bill(None, {})
            return
        principal, reference = admission.principal, secrets.token_hex(16)
        expires_at = time.time() + timeout + self.settings.hold_grace_s
        bill = _Bill(None, {"auth": admission.auth_s})
        holding = bill.holding = self._hold(principal.key_id, price, reference, expires_at, bill)
        stop = _StopIfRefused(asyncio.current_task())
        try:
            # Overlapped: the hold commits while the request queues and renders, when the
            # balance this process last saw for the key covers the price (else the hold
            # comes first: a key that cannot pay gets no render). Nothing is delivered
            # before the hold has committed, and a refused hold stops the render at once.
            seen = self.ledger.hints.balance.get(principal.key_id, -1)
            if overlap and seen >= price:
                holding.add_done_callback(stop.refused)
            else:
                await asyncio.shield(holding)
            stop.armed = True
            yield bill
            stop.armed = False
            bill.remaining = await asyncio.shield(holding)
        except BaseException as exc:
            stop.armed = False
            cause = stop.answer(exc, holding)
            # shield: a cancelled request (the client left) must still get its refund.
            await asyncio.shield(self._refund(reference, cause, holding))
            if cause is exc:
                raise
            raise cause from None
        start = time.perf_counter()
        await asyncio.shield(self._capture(reference))
        bill.timings["credits_capture"] = time.perf_counter() - start

    def _hold(
        self, key_id: int, price: int, reference: str, expires_at: float, bill: _Bill
    ) -> asyncio.Future[int]:
        """The hold's commit as a task of its own: a request cancelled meanwhile cannot
        stop it, so ``_refund`` waits for it and knows whether there is anything to return."""
        start = time.perf_counter()
        holding = asyncio.ensure_future(
            asyncio.to_thread(self.ledger.hold, key_id, price, reference, expires_at)
        )
        holding.add_done_callback(
            lambda _: bill.timings.setdefault("credits_hold", time.perf_counter() - start)
        )
        return holding

    async def _refund(
        self, reference: str, cause: BaseException, holding: asyncio.Future[int]
    ) -> None:
        """Return the hold if it was taken; if it was refused (no credits, no database),
        that refusal is the request's answer, whatever the render did meanwhile."""
        await asyncio.wait([holding])
        if holding.cancelled():  # the loop is shutting down: the sweep returns any hold
            return
        refused = holding.exception()
        if refused is not None:
            if isinstance(cause, Exception) and refused is not cause:
                raise refused
            return
        try:
            await asyncio.to_thread(self.ledger.release, reference)
        except StoreUnavailable as exc:
            if isinstance(cause, asyncio.CancelledError):
                return  # nobody to tell; the sweep returns the hold
            raise StoreUnavailable(self._held_message(cause), retry_after=5) from exc

    async def _capture(self, reference: str) -> None:
        try:
            captured = await asyncio.to_thread(self.ledger.capture, reference)
        except StoreUnavailable as exc:
            raise StoreUnavailable(
                self._held_message(None, "the image could not be charged"), retry_after=5
            ) from exc
        if not captured:  # the sweep released it: the request outlived its hold
            raise DeadlineExceeded(
                "The request outlived its credit hold (its deadline plus "
                f"{self.settings.hold_grace_s:g} s), so it was not charged and its image is "
                "not delivered. Retry with a longer X-Deadline-Seconds."
            )

    def _held_message(self, cause: BaseException | None, what: str = "") -> str:
        """Never "nothing was charged" when the refund itself did not go through."""
        reason = what or (cause.message if isinstance(cause, ZImageError) else "it failed")
        return (
            f"The request did not complete ({reason}), and the database is unavailable, "
            "so its credits stay reserved for now: they are returned automatically within "
            f"{self.settings.hold_grace_s:g} s of the request's deadline once the database "
            "is back. Retry shortly."
        )

    async def render(
        self,
        params: GenerationParams,
        seed: int,
        timeout: float,
        job_id: str | None = None,
        *,
        tenant: str,
        stream_id: str | None = None,
        inputs: InputImages | None = None,
    ) -> Generated:
        """Render and encode, unbilled (callers own billing). ``job_id`` names the render
        in the engine so it can be located and cancelled; such renders were admitted
        earlier (at submit, or before a restart) and skip the queue bound. ``stream_id``
        names a render whose events a client streams (admitted as usual). Adapters fetched
        by URL stay on disk until the image is made."""
        with self.loras.holding(params.loras):
            return await self._render(
                params, seed, timeout, job_id, tenant=tenant, stream_id=stream_id, inputs=inputs
            )

    async def _render(
        self,
        params: GenerationParams,
        seed: int,
        timeout: float,
        job_id: str | None,
        *,
        tenant: str,
        stream_id: str | None,
        inputs: InputImages | None,
    ) -> Generated:
        start = time.perf_counter()
        spec = RenderSpec(
            prompt=params.prompt,
            seed=seed,
            width=round_up_16(params.width),
            height=round_up_16(params.height),
            steps=params.steps,
            guidance_scale=params.guidance_scale,
            tenant=tenant,
            preview_size=params.preview_pixels,
            loras=await self.check_loras(params) if params.loras else (),
            task=engine_task(params),
            strength=params.effective_strength,
            image=inputs.image if inputs else b"",
            mask=inputs.mask if inputs else b"",
            control=inputs.control if inputs else b"",
            control_scale=params.controlnet_conditioning_scale
            if params.task == "controlnet"
            else 0.0,
        )
        render_id = job_id or stream_id
        result = await self.engine.render(spec, timeout, render_id, admitted=job_id is not None)
        encode_start = time.perf_counter()
        try:  # the encoder reads the pixels in place; its view keeps them until it is done
            data = await asyncio.to_thread(
                encode_image,
                result.pixels(),
                (result.width, result.height),
                (params.width, params.height),
                params.image_format,
                params.quality,
            )
        finally:
            result.close()
        timings = {**result.timings, "image_encode": time.perf_counter() - encode_start}
        return Generated(
            data,
            params,
            seed,
            time.perf_counter() - start,
            timings,
            result.transformer_passes,
            result.batch_size,
            result.prompt_tokens,
            result.worker,
            result.prompt_source,
        )
