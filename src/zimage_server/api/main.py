"""The app factory: settings in, a FastAPI app with every router and handler out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from zimage_server import __version__
from zimage_server.accounts import AccessControl, KeyService, RateLimiter
from zimage_server.api.errors import install_error_handlers
from zimage_server.api.middleware import (
    BodyLimitMiddleware,
    Drain,
    DrainMiddleware,
    HostMiddleware,
    RequestIdMiddleware,
    takes_images,
)
from zimage_server.api.routes import admin, health, metrics, openai_images, outputs, v1, v2
from zimage_server.api.routes.playground import mount_playground
from zimage_server.billing import Ledger, Pricing
from zimage_server.core.config import Settings
from zimage_server.core.errors import StoreUnavailable, ZImageError
from zimage_server.engine import Engine, EngineLike
from zimage_server.engine.handle import ProgressCallback
from zimage_server.images import GenerationService
from zimage_server.jobs import JobRunner
from zimage_server.jobs.repository import JobRepository
from zimage_server.jobs.runner import replica_name
from zimage_server.jobs.webhooks import WebhookDeliverer, WebhookPolicy
from zimage_server.protocol.segmind import TASK_SLUGS
from zimage_server.store import Outputs, OutputStore
from zimage_server.store.db import Database
from zimage_server.streams import ProgressHub
from zimage_server.streams.shared import SharedEvents
from zimage_server.telemetry import Metrics

log = logging.getLogger("zimage.api")
SWEEP_INTERVAL_S = 60.0


async def _sweep_forever(store: Outputs) -> None:
    while True:
        await asyncio.sleep(SWEEP_INTERVAL_S)
        try:
            removed = await asyncio.to_thread(store.sweep)
        except ZImageError as exc:  # the bucket is down: the next sweep catches up
            log.warning("output sweep: %s", exc.message)
            continue
        if removed:
            log.info("removed %d expired outputs", removed)


def output_store(settings: Settings, clock: Callable[[], float]) -> Outputs:
    """The data folder, or the bucket that ``ZIMAGE_OUTPUT_BUCKET`` names."""
    if settings.output_bucket is None:
        return OutputStore(
            settings.outputs_dir, settings.output_ttl_s, settings.output_min_free_bytes, clock=clock
        )
    from zimage_server.store.buckets import BucketStore

    return BucketStore(
        settings.output_bucket,
        settings.output_ttl_s,
        endpoint_url=settings.output_s3_endpoint,
        region=settings.output_s3_region,
        prefix=settings.output_s3_prefix,
        presigned=settings.output_urls == "presigned",
        clock=clock,
    )


async def _release_expired_holds(ledger: Ledger, grace_s: float) -> None:
    """Return the credits of holds no live request can settle any more: at start (a
    server killed mid-render) and then often enough that none outlives its expiry long."""
    while True:
        try:
            released = await asyncio.to_thread(ledger.sweep)
        except StoreUnavailable:
            released = 0  # the database is down: the holds wait for it, as do requests
        if released:
            log.info("released %d expired credit holds", released)
        await asyncio.sleep(min(30.0, max(0.2, grace_s / 2)))


@dataclass
class Services:
    """Everything the routes use, built once per app from the settings."""

    settings: Settings
    engine: EngineLike
    outputs: Outputs
    db: Database
    keys: KeyService
    ledger: Ledger
    access: AccessControl
    generation: GenerationService
    jobs: JobRunner
    policy: WebhookPolicy
    metrics: Metrics
    drain: Drain
    model_label: str
    events: ProgressHub


def build_services(
    settings: Settings,
    on_progress: ProgressCallback | None = None,
    engine: EngineLike | None = None,
    clock: Callable[[], float] = time.time,
) -> Services:
    """``clock`` (wall time) decides when outputs and finished jobs expire."""
    if engine is None:
        local = Engine.from_settings(settings, on_progress)
        engine, label = local, local.model_label
    else:  # weights live where that engine runs (e.g. Ray GPU replicas)
        label = "tiny (random weights)" if settings.tiny else settings.model
    outputs_store = output_store(settings, clock)
    db = Database(settings.resolved_database_url)
    db.upgrade()
    ledger = Ledger(db, sync_holds=settings.ledger_sync_holds)
    keys = KeyService(db, ledger, cache_s=settings.key_cache_s)
    replica = replica_name()
    limiter = RateLimiter(
        settings.rate_limit_storage,
        settings.default_rate_limit,
        settings.default_max_in_flight,
        process=replica,
        lifetime_s=settings.job_lease_s,
    )
    metrics_ = Metrics()
    pricing = Pricing(
        settings.price_reference,
        settings.price_minimum,
        settings.price_lora_surcharge,
        settings.price_controlnet_surcharge,
    )
    generation = GenerationService(settings, engine, outputs_store, ledger, pricing, metrics_)
    policy = WebhookPolicy.from_settings(settings)
    repo = JobRepository(db, settings.output_ttl_s, clock=clock, hints=ledger.hints)
    hub = ProgressHub(
        engine.position,
        buffer=settings.stream_buffer_events,
        retention_s=settings.stream_retention_s,
    )
    engine.watch(hub.update)
    shared = SharedEvents.from_settings(settings, metrics_)
    if shared is not None:
        hub.tap(shared.publish)
    runner = JobRunner(
        settings, repo, engine, generation, outputs_store, limiter, policy, hub, replica, shared
    )
    metrics_.watch(
        depth=lambda: engine.depth,
        restarts=engine.restarts,
        load_s=engine.load_seconds,
        ready=lambda: float(engine.state.value == "READY"),
    )
    if isinstance(engine, Engine):  # Ray replicas keep their workers' figures to themselves
        engine.watch_batches(metrics_.record_batch)
    metrics_.cluster_depth.set_function(lambda: runner.cluster.depth)
    metrics_.cluster_oldest.set_function(lambda: runner.cluster.oldest_wait_s)
    for task in TASK_SLUGS.values():
        metrics_.cluster_task_oldest.labels(task).set_function(_oldest_of(runner, task))
    return Services(
        settings,
        engine,
        outputs_store,
        db,
        keys,
        ledger,
        AccessControl(keys, limiter, settings.auth_required),
        generation,
        runner,
        policy,
        metrics_,
        Drain(),
        label,
        hub,
    )


def _oldest_of(runner: JobRunner, task: str) -> Callable[[], float]:
    """The cluster's oldest wait for ``task``, as of the runner's last heartbeat."""
    return lambda: runner.cluster.oldest_wait_of(task)


@contextlib.asynccontextmanager
async def _running(services: Services) -> AsyncIterator[None]:
    """Start the engine, recover jobs, run background tasks; undo it all at shutdown."""
    s = services
    await s.engine.start()
    await s.jobs.start()
    background = [
        asyncio.create_task(_sweep_forever(s.outputs)),
        asyncio.create_task(_release_expired_holds(s.ledger, s.settings.hold_grace_s)),
    ]
    deliverer = None
    if s.settings.webhook_secret is not None:
        deliverer = WebhookDeliverer.from_settings(s.jobs.repo, s.settings, s.jobs.replica)
        background.append(asyncio.create_task(deliverer.run_forever()))
    try:
        yield
    finally:
        for task in background:
            task.cancel()
        await s.jobs.stop()
        await s.engine.stop()
        if deliverer:
            await deliverer.close()
        s.access.limiter.close()
        if s.jobs.shared is not None:
            await s.jobs.shared.close()
        s.db.dispose()


def create_app(
    settings: Settings,
    on_progress: ProgressCallback | None = None,
    engine: EngineLike | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The whole API. ``engine`` replaces the local worker processes (Ray Serve passes one
    that forwards renders to its GPU replicas); tests pass a ``clock`` they can move."""
    services = build_services(settings, on_progress, engine, clock)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with _running(services):
            yield

    # /docs and /redoc load their Swagger UI 5 and ReDoc assets from the installed
    # fastapi-offline package, not a CDN: the docs work on an air-gapped install.
    app = FastAPIOffline(
        title="zimage-server",
        version=__version__,
        summary="Self-hosted, Segmind-compatible API for Z-Image-Turbo.",
        lifespan=lifespan,
        favicon_url="/static/favicon.svg",
    )
    state = app.state
    state.services, state.settings, state.engine = services, settings, services.engine
    state.outputs, state.model_label, state.keys = (
        services.outputs,
        services.model_label,
        services.keys,
    )
    state.ledger, state.access, state.generation = (
        services.ledger,
        services.access,
        services.generation,
    )
    state.jobs, state.metrics, state.drain = services.jobs, services.metrics, services.drain
    state.events = services.events
    # The render routes first: FastAPI matches a request against each included router in
    # turn, and most requests are renders. (A wrong method still gets every allowed one:
    # FastAPI's 405 lists the methods of all the routes whose path matched.)
    for module in (v1, v2, openai_images, outputs, metrics, health):
        app.include_router(module.router)
    # The admin API answers 404 without a token configured: then it is not documented either.
    app.include_router(admin.router, include_in_schema=settings.admin_token is not None)
    install_error_handlers(app)
    mount_playground(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
        image_max_bytes=settings.input_max_body_bytes,
        image_paths=takes_images,
    )
    app.add_middleware(DrainMiddleware, drain=services.drain)
    app.add_middleware(HostMiddleware, allowed=settings.served_hosts)
    app.add_middleware(RequestIdMiddleware, metrics=services.metrics)
    if settings.trusted_proxies:  # here, not in uvicorn, so that Ray's ingress does the same
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)
    return app
