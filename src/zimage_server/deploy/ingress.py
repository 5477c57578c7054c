"""ApiIngress: the whole FastAPI app (v1, v2, OpenAI, metrics, playground) as Serve's
ingress, with a ``RayEngine`` in place of the local worker processes.

The app is built inside the replica (``__serve_build_asgi_app__``, Ray >= 2.56), not pickled
from the driver: it holds a database engine and background tasks. Serve then runs the app's
lifespan (engine start, job recovery, webhook delivery, output sweeping) as uvicorn would.
Any number of ingress replicas share the store: jobs and webhooks run under leases, limits
live in Redis and images in a bucket (deploy/README.md), so none of them is a single point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray import serve

from zimage_server.core.config import Settings
from zimage_server.deploy.options import INGRESS_DEPLOYMENT, RayOptions
from zimage_server.deploy.ray_engine import RayEngine

if TYPE_CHECKING:
    from fastapi import FastAPI


@serve.deployment(name=INGRESS_DEPLOYMENT, num_replicas=2, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class ApiIngress:
    def __init__(self, engine: Any, settings: Settings, options: RayOptions) -> None:
        self._handle, self._settings, self._options = engine, settings, options

    def __serve_build_asgi_app__(self) -> FastAPI:
        from zimage_server.api.main import create_app

        engine = RayEngine(
            self._handle,
            self._settings.max_queue,
            scales_to_zero=self._options.scales_to_zero,
            replica_retries=self._options.replica_retries,
        )
        return create_app(self._settings, engine=engine)
