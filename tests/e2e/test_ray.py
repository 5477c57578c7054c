"""Scale-out on Ray Serve, for real: a local Ray on CPU, the tiny model, PostgreSQL.

One Ray instance and one Serve HTTP proxy (loopback) per module. Two applications share it:
``main`` (two ingress replicas, two fixed engine replicas, keys on, the PostgreSQL store when
available) and ``zero`` (one ingress replica, engine autoscaling 0..1 with a short idle
delay, under ``/zero``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Server, fresh_database_url

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from zimage_server.core.config import Settings  # noqa: E402
from zimage_server.deploy import RayOptions  # noqa: E402
from zimage_server.deploy.options import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT  # noqa: E402

ADMIN = "ray-admin-token"
SMALL = {"prompt": "a paid-for cat", "width": 256, "height": 256, "steps": 1}
SLOW = {"prompt": "a slow cat", "width": 256, "height": 256, "steps": 8}
DEPLOY_TIMEOUT_S = 180
log = logging.getLogger("tests.ray")
pytestmark = pytest.mark.timeout(300)


@dataclass
class App:
    name: str
    url: str
    db_url: str
    postgres: bool

    def post(
        self, body: dict[str, Any], key: str | None = None, **headers: str
    ) -> requests.Response:
        if key:
            headers["x-api-key"] = key
        return requests.post(
            self.url + "/v1/z-image-turbo", json=body, headers=headers, timeout=120
        )

    def key(self, credits: str) -> str:
        from zimage_server.accounts import KeyService
        from zimage_server.billing import Ledger
        from zimage_server.billing.pricing import to_micro
        from zimage_server.store.db import Database

        db = Database(self.db_url)
        try:
            key, _ = KeyService(db, Ledger(db)).create("ray-test", to_micro(credits))
        finally:
            db.dispose()
        return key

    def usage(self, key: str) -> dict[str, str]:
        prefix = key.split("_")[1]
        r = requests.get(
            f"{self.url}/admin/keys/{prefix}/usage",
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _settings(folder: Path, db_url: str, **values: Any) -> Settings:
    return Settings(
        tiny=True,
        device="cpu",
        data_dir=folder,
        database_url=db_url,
        warmup_size=256,
        warmup_steps=1,
        **values,
    )


def _engine_replicas(app: str, deployment: str = ENGINE_DEPLOYMENT) -> list[str]:
    """Names of the live replica actors of ``app``'s ``deployment`` (``...#<name>#<id>``)."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(prefix)
    ]


def _running(app: str, deployment: str = ENGINE_DEPLOYMENT) -> int:
    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def _wait(what: str, check: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.25)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def proxy_url() -> Iterator[str]:
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def _deploy(settings: Settings, options: RayOptions) -> None:
    from zimage_server.deploy.ray_app import build_application

    serve.run(
        build_application(settings, options),
        name=options.app_name,
        route_prefix=options.route_prefix,
    )


@pytest.fixture(scope="module")
def main_app(proxy_url: str, tmp_path_factory: pytest.TempPathFactory) -> App:
    """Two fixed engine replicas behind the full API, keys on, PostgreSQL if available."""
    import os

    folder = tmp_path_factory.mktemp("ray-main")
    postgres = bool(os.environ.get("ZIMAGE_TEST_POSTGRES_URL"))
    db_url = fresh_database_url("postgresql" if postgres else "sqlite", folder)
    settings = _settings(
        folder,
        db_url,
        auth=True,
        admin_token=ADMIN,
        default_max_in_flight=32,
        max_queue=32,
        debug_step_delay_s=0.05,
        job_lease_s=2,  # a killed ingress replica's jobs are taken over within 2 s
        hold_grace_s=1,  # and its v1 requests' holds returned 1 s past their deadline
    )
    options = RayOptions(replicas=2, api_replicas=2, num_gpus=0, app_name="main", route_prefix="/")
    _deploy(settings, options)
    # Deployed is not ready: each ingress replica says READY once its poll has found an
    # engine replica with its model loaded and warmed up (what a readiness probe waits for).
    _wait("both ingress replicas to report READY", lambda: _ready(proxy_url), DEPLOY_TIMEOUT_S)
    return App("main", proxy_url, db_url, postgres)


def _ready(url: str, answers: int = 6) -> bool:
    """Several READY answers in a row: the proxy picks an ingress replica per request."""
    for _ in range(answers):
        with contextlib.suppress(requests.RequestException):
            if requests.get(url + "/readyz", timeout=10).json()["status"] == "READY":
                continue
        return False
    return True


@pytest.fixture(scope="module")
def zero_app(proxy_url: str, tmp_path_factory: pytest.TempPathFactory) -> App:
    """Autoscaling 0..1; it starts with one replica, which goes away when idle. One
    ingress replica: a v2 job's events are read from the replica that runs it."""
    folder = tmp_path_factory.mktemp("ray-zero")
    db_url = fresh_database_url("sqlite", folder)
    options = RayOptions(
        api_replicas=1,
        min_replicas=0,
        max_replicas=1,
        initial_replicas=1,
        downscale_delay_s=2,
        upscale_delay_s=0,
        num_gpus=0,
        app_name="zero",
        route_prefix="/zero",
    )
    _deploy(_settings(folder, db_url, auth=False, debug_step_delay_s=0.1), options)
    return App("zero", proxy_url + "/zero", db_url, False)


def test_two_replicas_share_a_burst_and_match_the_single_machine_image(
    main_app: App, server: Server
) -> None:
    key = main_app.key("10")
    assert requests.get(main_app.url + "/readyz", timeout=10).json()["status"] == "READY"
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: main_app.post(SLOW, key), range(8)))
    assert [r.status_code for r in replies] == [200] * 8, [r.text for r in replies]
    replicas = {r.headers["X-Replica"] for r in replies}
    assert len(replicas) == 2, replicas
    assert {name.rsplit("#", 1)[1] for name in _engine_replicas("main")} == replicas

    body = {**SMALL, "seed": 1234, "image_format": "png"}
    on_ray = main_app.post(body, key, Accept="image/png")
    alone = server.post(body, headers={"Accept": "image/png"})
    assert on_ray.status_code == alone.status_code == 200, (on_ray.text, alone.text)
    assert on_ray.headers["content-type"] == "image/png"
    assert on_ray.content == alone.content


def test_async_jobs_and_metrics_work_through_the_ingress(main_app: App) -> None:
    key = main_app.key("1")
    headers = {"x-api-key": key}
    submitted = requests.post(
        main_app.url + "/v2/z-image-turbo", json={**SMALL, "seed": 5}, headers=headers, timeout=30
    )
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    deadline = time.monotonic() + 60
    while (status := requests.get(job["status_url"], headers=headers, timeout=30).json())[
        "status"
    ] not in ("COMPLETED", "FAILED", "CANCELLED"):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert status["status"] == "COMPLETED", status
    result = requests.get(job["response_url"], headers=headers, timeout=30).json()
    image = requests.get(result["output"], timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/webp"
    metrics = requests.get(main_app.url + "/metrics", timeout=10)
    assert metrics.status_code == 200 and "zimage_worker_restarts" in metrics.text


def test_a_killed_replica_is_answered_for_and_replaced(main_app: App) -> None:
    key = main_app.key("10")
    before = _engine_replicas("main")
    assert len(before) == 2
    victim = before[0]
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(main_app.post, SLOW, key) for _ in range(12)]
        time.sleep(1.5)  # both replicas are rendering, more requests wait in Serve's queue
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        replies = [f.result() for f in futures]
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 502}, [r.text for r in replies]
    assert codes.count(200) >= 6, codes  # everything the survivor took, and the retries
    for reply in replies:
        if reply.status_code == 502:
            assert "replica died" in reply.json()["error"]

    took = _wait(
        "Serve to replace the killed replica",
        lambda: victim not in _engine_replicas("main") and _running("main") == 2,
        DEPLOY_TIMEOUT_S,
    )
    after = main_app.post(SMALL, key)
    assert after.status_code == 200, after.text
    # Each ingress replica counts the deaths it saw; /metrics reaches one of the two at a
    # time, so ask until the one that saw it answers.
    deaths = max(_restarts_seen(main_app) for _ in range(20))
    assert deaths >= 1  # an ingress saw requests die with the replica (and re-sent them)
    log.warning(f"replica replaced in {took:.1f}s; codes {sorted(codes)}")


def _restarts_seen(app: App) -> float:
    metrics = requests.get(app.url + "/metrics", timeout=10).text
    return next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("zimage_worker_restarts ")
    )


def test_credits_stay_exact_across_replicas(main_app: App) -> None:
    if not main_app.postgres:
        pytest.skip("ZIMAGE_TEST_POSTGRES_URL is not set (scripts/start-postgres prints one)")
    key = main_app.key("0.03")  # exactly three 256x256 one-step images
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda _: main_app.post(SMALL, key), range(12)))
    codes = sorted(r.status_code for r in replies)
    assert codes == [200] * 3 + [406] * 9, [r.text for r in replies]
    usage = main_app.usage(key)
    assert usage["balance"] == "0" and usage["ledger_sum"] == "0", usage
    assert usage["images"] == 3, usage


# -- progress through Ray: the replicas stream their steps to the ingress (issue 16) -------

Event = tuple[str, dict[str, Any]]


def _events(reply: requests.Response) -> list[Event]:
    """A server-sent event stream as (event, data); comments skipped."""
    events, name = [], ""
    for line in reply.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: ") and name:
            events.append((name, json.loads(line[6:])))
            name = ""
    return events


def _steps(events: list[Event]) -> list[tuple[int, int]]:
    return [(data["step"], data["total"]) for name, data in events if name == "step"]


def test_a_v1_stream_through_ray_shows_every_step_and_its_previews(main_app: App) -> None:
    key = main_app.key("1")
    body = {**SMALL, "steps": 3, "width": 512, "preview_size": 64}
    headers = {"x-api-key": key, "Accept": "text/event-stream"}
    with requests.post(
        main_app.url + "/v1/z-image-turbo", json=body, headers=headers, stream=True, timeout=60
    ) as reply:
        assert reply.status_code == 200, reply.text
        events = _events(reply)
    names = [name for name, _ in events]
    assert names == ["queued", "started", "step", "step", "step", "completed"], names
    assert _steps(events) == [(1, 3), (2, 3), (3, 3)]
    previews = [_decode(data["preview"]) for name, data in events if name == "step"]
    assert all(image.format == "WEBP" and image.size == (64, 32) for image in previews)
    assert previews[0].tobytes() != previews[-1].tobytes()  # it sharpens as it renders
    assert events[-1][1]["image"].startswith(main_app.url + "/v1/outputs/")


def _decode(preview: dict[str, Any]) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(preview["image"])))
    image.load()
    return image


def test_v2_events_through_ray_show_started_and_every_step(zero_app: App) -> None:
    url = zero_app.url + "/v2/z-image-turbo"
    # The job waits 2 s behind the blocker on the one engine replica: the reader is there
    # before it starts, so it sees every step (a late reader gets only the latest one).
    blocker = requests.post(url, json={**SMALL, "steps": 20}, timeout=60)
    job = requests.post(url, json={**SMALL, "steps": 4}, timeout=60)
    assert blocker.status_code == job.status_code == 202, (blocker.text, job.text)
    events_url = f"{zero_app.url}/v2/requests/{job.json()['request_id']}/events"
    with requests.get(events_url, stream=True, timeout=60) as reply:
        assert reply.status_code == 200, reply.text
        events = _events(reply)
    names = [name for name, _ in events]
    assert names == ["queued", "started", "step", "step", "step", "step", "completed"], names
    assert _steps(events) == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all("preview" not in data for _, data in events)  # none asked for
    assert events[-1][1]["status"] == "COMPLETED"


# -- an ingress replica killed mid-burst (issue 18) -----------------------------------------

JOB = {"prompt": "a cat on two ingress replicas", "width": 256, "height": 256, "steps": 4}


def _submit(app: App, key: str, idempotency: str) -> dict[str, Any]:
    """Submit a v2 job, again under the same Idempotency-Key while its ingress replica is
    dead (the proxy errs, or the connection drops): one job however often it is sent."""
    headers = {"x-api-key": key, "Idempotency-Key": idempotency}
    for _ in range(40):
        with contextlib.suppress(requests.RequestException):
            reply = requests.post(
                app.url + "/v2/z-image-turbo", json=JOB, headers=headers, timeout=30
            )
            if reply.status_code in (200, 202):
                return reply.json()  # type: ignore[no-any-return]
            assert reply.status_code >= 500, reply.text
        time.sleep(0.5)
    raise AssertionError(f"job {idempotency} was never accepted")


def _v1(app: App, key: str) -> int:
    """A v1 request's status; 0 when its connection dropped with its ingress replica."""
    headers = {"x-api-key": key, "X-Deadline-Seconds": "15"}
    try:
        reply = requests.post(app.url + "/v1/z-image-turbo", json=JOB, headers=headers, timeout=60)
    except requests.RequestException:
        return 0
    return reply.status_code


def _wait_done(app: App, key: str, job: dict[str, Any]) -> str:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            reply = requests.get(job["status_url"], headers={"x-api-key": key}, timeout=30)
            if reply.status_code in (200, 422):
                status = str(reply.json()["status"])
                if status in ("COMPLETED", "FAILED", "CANCELLED"):
                    return status
        time.sleep(0.25)
    raise AssertionError(f"job {job['request_id']} did not finish")


def _held_by(db_url: str, pid: int) -> set[str]:
    """Unfinished jobs whose lease names the ingress replica process ``pid``."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text(
                    "SELECT id FROM jobs WHERE status IN ('QUEUED', 'PROCESSING') "
                    "AND claimed_by LIKE :pattern"
                ),
                {"pattern": f"%-{pid}-%"},
            ).all()
    finally:
        engine.dispose()
    return {str(row[0]) for row in rows}


def _pid(actor_name: str) -> int:
    """The process of a replica actor (leases name their process by its pid)."""
    import os

    actor = ray.get_actor(actor_name, namespace="serve")
    return int(ray.get(actor.__ray_call__.remote(lambda _replica: os.getpid()), timeout=30))


def test_killing_an_ingress_replica_mid_burst_loses_nothing(main_app: App) -> None:
    if not main_app.postgres:
        pytest.skip("ZIMAGE_TEST_POSTGRES_URL is not set (scripts/start-postgres prints one)")
    from tests.e2e.test_scale_out import _assert_each_job_billed_once
    from zimage_server.billing import Pricing, format_credits
    from zimage_server.billing.pricing import to_micro

    key, price = main_app.key("10"), Pricing().price(256, 256, 4)
    ingress = _engine_replicas("main", INGRESS_DEPLOYMENT)
    assert len(ingress) == 2, ingress
    victim, tag = ingress[0], secrets.token_hex(4)
    pid = _pid(victim)
    with ThreadPoolExecutor(16) as pool:
        early = [pool.submit(_submit, main_app, key, f"{tag}-{i}") for i in range(10)]
        v1 = [pool.submit(_v1, main_app, key) for _ in range(4)]
        jobs = [future.result() for future in early]
        _wait("the victim to hold jobs", lambda: len(_held_by(main_app.db_url, pid)) >= 2, 20)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        time.sleep(0.5)  # it is dead: what it held now is orphaned
        orphans = _held_by(main_app.db_url, pid)
        late = [pool.submit(_submit, main_app, key, f"{tag}-{i}") for i in range(10, 16)]
        jobs += [future.result() for future in late]
        codes = [future.result() for future in v1]
    assert orphans, "the kill came after the victim's jobs were done"
    assert len({job["request_id"] for job in jobs}) == 16
    assert set(codes) <= {0, 200, 500, 502, 503}, codes
    statuses = [_wait_done(main_app, key, job) for job in jobs]
    assert statuses == ["COMPLETED"] * 16, statuses
    assert not _held_by(main_app.db_url, pid)

    took = _wait(
        "Serve to replace the killed ingress replica",
        lambda: (
            victim not in _engine_replicas("main", INGRESS_DEPLOYMENT)
            and _running("main", INGRESS_DEPLOYMENT) == 2
        ),
        DEPLOY_TIMEOUT_S,
    )
    paid = 16 + codes.count(200)  # the jobs and the v1 requests answered; no others
    expected = format_credits(to_micro("10") - paid * price)
    deadline = time.monotonic() + 30  # a dead replica's v1 holds: deadline + grace
    while (used := main_app.usage(key))["balance"] != expected:
        assert time.monotonic() < deadline, (used, expected, codes)
        time.sleep(0.25)
    assert used["images"] == paid and used["ledger_sum"] == used["balance"], used
    _assert_each_job_billed_once(main_app.db_url, [job["request_id"] for job in jobs])
    log.warning(
        f"ingress replica replaced in {took:.1f}s; {len(orphans)} jobs taken over; "
        f"v1 codes {sorted(codes)}"
    )


def test_scale_to_zero_then_a_request_starts_a_replica(zero_app: App) -> None:
    idle = _wait(
        "the idle replica to be removed",
        lambda: _running("zero") == 0 and not _engine_replicas("zero"),
        120,
    )
    ready = requests.get(zero_app.url + "/readyz", timeout=10)
    assert ready.status_code == 200, ready.text  # ready: requests wait for a replica

    start = time.monotonic()
    reply = zero_app.post({**SMALL, "seed": 7}, **{"X-Deadline-Seconds": "120"})
    cold = time.monotonic() - start
    assert reply.status_code == 200, reply.text
    assert reply.headers["X-Replica"]
    assert _running("zero") == 1
    log.warning(f"scaled to zero after {idle:.1f}s idle; cold request took {cold:.1f}s")


# -- RayEngine against a fake handle: error mapping, the bound, cancel, deadline ------------


class _FakeResponse:
    """A unary answer (awaited) or a stream (iterated): ``updates``, then the outcome."""

    def __init__(self, outcome: Callable[[], Any], delay: float, updates: list[Any]) -> None:
        self.outcome, self.delay, self.cancelled = outcome, delay, False
        self.items: list[Callable[[], Any]] = [*(lambda u=u: u for u in updates), self._run]

    def __await__(self) -> Any:
        return self._run().__await__()

    async def _run(self) -> Any:
        await asyncio.sleep(self.delay)
        return self.outcome()

    def __aiter__(self) -> _FakeResponse:
        return self

    async def __anext__(self) -> Any:
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)()
        return await item if asyncio.iscoroutine(item) else item

    def cancel(self) -> None:
        self.cancelled = True


class _FakeMethod:
    def __init__(
        self, outcomes: list[Callable[[], Any]], delay: float, updates: tuple[Any, ...] = ()
    ) -> None:
        self.outcomes, self.delay, self.updates, self.sent = outcomes, delay, updates, []

    def remote(self, *args: Any) -> _FakeResponse:
        self.sent.append(args)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        return _FakeResponse(outcome, self.delay, list(self.updates))


class _FakeHandle:
    def __init__(
        self, *outcomes: Callable[[], Any], delay: float = 0.0, updates: tuple[Any, ...] = ()
    ) -> None:
        self.render = _FakeMethod(list(outcomes), delay, updates)
        self.status = _FakeMethod([lambda: _status("READY")], 0.0)
        self.streamed = False

    def options(self, stream: bool = False) -> _FakeHandle:
        self.streamed = stream
        return self


def _status(state: str) -> Any:
    from zimage_server.deploy.replica import ReplicaStatus

    return ReplicaStatus("r1", state, None, 1.5, 0.0, 0)


def _result() -> Any:
    from zimage_server.engine import RenderResult

    return RenderResult(
        rgb=b"\0" * 12, width=2, height=2, transformer_passes=1, prompt_tokens=3, worker="r1"
    )


def _raise(exc: BaseException) -> Callable[[], Any]:
    def outcome() -> Any:
        raise exc

    return outcome


def _from_replica(exc: BaseException) -> BaseException:
    """What Ray hands the caller when a replica raises ``exc``."""
    import pickle

    from ray.exceptions import RayTaskError

    cause = pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own bytes
    return RayTaskError("render", "traceback", cause).as_instanceof_cause()  # type: ignore[no-any-return]


def _spec() -> Any:
    from zimage_server.engine import RenderSpec

    return RenderSpec(prompt="a cat", seed=1, width=256, height=256, steps=1, guidance_scale=1.0)


def test_ray_engine_maps_ray_failures_to_our_errors() -> None:
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from zimage_server.core import errors
    from zimage_server.deploy.ray_engine import RayEngine

    async def run() -> None:
        retried = RayEngine(_FakeHandle(_raise(ActorDiedError()), _result), 4)
        assert (await retried.render(_spec(), 5)).worker == "r1"
        assert retried.restarts() == 1
        died = RayEngine(_FakeHandle(_raise(ActorDiedError())), 4, replica_retries=0)
        with pytest.raises(errors.WorkerDied):
            await died.render(_spec(), 5)
        busy = RayEngine(_FakeHandle(_raise(BackPressureError(9, 8, 503, 7.0))), 4)
        with pytest.raises(errors.Overloaded) as overloaded:
            await busy.render(_spec(), 5)
        assert overloaded.value.retry_after == 7
        # A replica's own error arrives wrapped by Ray, pickled: it comes out as it went in.
        remote = _from_replica(errors.Overloaded("full", retry_after=3))
        full = RayEngine(_FakeHandle(_raise(remote)), 4)
        with pytest.raises(errors.Overloaded) as replica_full:
            await full.render(_spec(), 5)
        assert type(replica_full.value) is errors.Overloaded
        assert replica_full.value.retry_after == 3
        oom = RayEngine(_FakeHandle(_raise(_from_replica(errors.GenerationFailed("OOM")))), 4)
        with pytest.raises(errors.GenerationFailed, match="OOM"):
            await oom.render(_spec(), 5)

    asyncio.run(run())


def test_ray_engine_bounds_admission_cancels_and_keeps_deadlines() -> None:
    from zimage_server.core import errors
    from zimage_server.deploy.ray_engine import RayEngine
    from zimage_server.engine import EngineState

    async def run() -> None:
        handle = _FakeHandle(_result, delay=0.5)
        engine = RayEngine(handle, max_queue=2)
        assert engine.state == EngineState.STARTING
        await engine.start()
        first = asyncio.create_task(engine.render(_spec(), 5, "job-1"))
        second = asyncio.create_task(engine.render(_spec(), 5, "job-2"))
        await asyncio.sleep(0.05)
        assert engine.depth == 2
        with pytest.raises(errors.Overloaded):
            await engine.render(_spec(), 5)
        assert engine.cancel("job-2")
        with pytest.raises(errors.Cancelled):
            await second
        assert (await first).worker == "r1"
        assert engine.state == EngineState.READY and engine.load_seconds() == 1.5
        with pytest.raises(errors.DeadlineExceeded):
            await engine.render(_spec(), 0.1)
        assert engine.depth == 0
        await engine.stop()
        zero = RayEngine(_FakeHandle(_result), 2, scales_to_zero=True)
        await zero.start()
        assert zero.state == EngineState.READY  # without asking (which would start a replica)

    asyncio.run(run())


def test_ray_engine_passes_the_replicas_steps_on_and_reports_progress() -> None:
    from zimage_server.deploy.ray_engine import RayEngine
    from zimage_server.engine import RenderUpdate

    sent = (
        RenderUpdate(render_id="job-1", stage="started", total=3),
        *(RenderUpdate(render_id="job-1", stage="step", step=i, total=3) for i in (1, 2, 3)),
    )

    async def run() -> None:
        handle = _FakeHandle(_result, delay=0.3, updates=sent)
        engine = RayEngine(handle, max_queue=2)
        heard: list[RenderUpdate] = []
        engine.watch(heard.append)
        render = asyncio.create_task(engine.render(_spec(), 5, "job-1"))
        await asyncio.sleep(0.1)
        assert engine.progress("job-1") == (3, 3)  # v2 status: PROCESSING, step 3 of 3
        assert (await render).worker == "r1"
        assert engine.progress("job-1") is None
        assert handle.streamed
        assert [(u.stage, u.step) for u in heard] == [
            ("queued", 0),
            ("started", 0),
            ("step", 1),
            ("step", 2),
            ("step", 3),
        ]

    asyncio.run(run())


def test_a_replicas_unsent_steps_are_bounded_and_never_wait() -> None:
    """What a replica has not sent yet keeps ``started`` and only the newest steps."""
    from zimage_server.deploy.replica import STEP_BUFFER, _Updates
    from zimage_server.engine import RenderUpdate

    async def run() -> None:
        updates = _Updates(STEP_BUFFER)
        updates.push(RenderUpdate(render_id="j", stage="started", total=50))
        for step in range(1, 51):  # nobody takes them: pushing must neither wait nor grow
            updates.push(RenderUpdate(render_id="j", stage="step", step=step, total=50))
        taken = updates.take()
        assert [(u.stage, u.step) for u in taken] == [
            ("started", 0),
            *(("step", step) for step in range(51 - STEP_BUFFER, 51)),
        ]
        assert updates.take() == []
        never = asyncio.ensure_future(asyncio.sleep(10))
        waiting = asyncio.ensure_future(updates.wait_for(never))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert not waiting.done()
        updates.push(RenderUpdate(render_id="j", stage="step", step=51, total=50))
        await asyncio.wait_for(waiting, 1)
        never.cancel()

    asyncio.run(run())


def test_cli_options_fixed_or_autoscaling_and_refuse_bad_bounds() -> None:
    from zimage_server.core.errors import StartupError
    from zimage_server.deploy.cli import ray_options

    cpu = Settings(device="cpu")
    fixed = ray_options(cpu, None, 2, None, None)
    assert fixed.replicas == 2 and fixed.num_gpus == 0 and fixed.autoscaling_config() is None
    scaled = ray_options(cpu, None, None, 0, 3)
    assert scaled.scales_to_zero and scaled.autoscaling_config() == {
        "min_replicas": 0,
        "max_replicas": 3,
        "target_ongoing_requests": 2.0,
        "downscale_delay_s": 60.0,
        "upscale_delay_s": 3.0,
        "metrics_interval_s": 1.0,
        "look_back_period_s": 5.0,
    }
    assert ray_options(Settings(device="auto"), "auto", None, None, None).num_gpus == 1
    with pytest.raises(StartupError, match="exceeds max_replicas"):
        ray_options(cpu, None, None, 3, 2)
    assert RayOptions.model_validate({"min_replicas": "0", "max_replicas": "2"}).scales_to_zero
