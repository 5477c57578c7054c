"""``zimage serve --ray``: deploy the API and the engine replicas on Ray Serve and block.

Without an address a local Ray instance is started (every GPU of this machine becomes a
replica); with one (``auto``, ``ray://head:10001``) the application is deployed on that
cluster. Ctrl-C removes the application (and stops the local instance).
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

from zimage_server.core.config import Settings
from zimage_server.core.errors import StartupError
from zimage_server.deploy.options import RayOptions

log = logging.getLogger("zimage.deploy")


def ray_options(
    settings: Settings,
    address: str | None,
    replicas: int | None,
    min_replicas: int | None,
    max_replicas: int | None,
    api_replicas: int | None = None,
) -> RayOptions:
    """Fixed ``replicas``, or autoscaling between ``min_replicas`` (default 1) and
    ``max_replicas`` (default: this machine's GPUs for a local Ray, else ``min_replicas``);
    ``api_replicas`` ingress replicas (default 2).

    Replicas reserve one GPU each, none with ``--device cpu`` or, for a local Ray, when this
    machine has no GPU."""
    from zimage_server.engine.model_source import detect_devices

    if address is None:
        devices = detect_devices(settings.device)
        on_gpu, gpus = devices[0].startswith("cuda"), len(devices)
    else:  # the cluster's GPUs are not this machine's
        on_gpu, gpus = settings.device != "cpu", 1
    values: dict[str, object] = {"num_gpus": 1.0 if on_gpu else 0.0}
    if api_replicas is not None:
        values["api_replicas"] = api_replicas
    if replicas is not None:
        values["replicas"] = replicas
    else:
        low = 1 if min_replicas is None else min_replicas
        values["min_replicas"] = low
        values["max_replicas"] = max_replicas or max(low, gpus if on_gpu else 1, 1)
    try:
        return RayOptions.model_validate(values)
    except ValueError as exc:
        raise StartupError(f"Invalid Ray options: {exc}") from None


def serve_ray(
    settings: Settings,
    address: str | None = None,
    replicas: int | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    api_replicas: int | None = None,
) -> None:
    """Deploy on Ray Serve (HTTP on ``settings.host:settings.port``) and block until Ctrl-C.

    Raises ``StartupError`` when Ray is not installed or the options are inconsistent."""
    options = ray_options(settings, address, replicas, min_replicas, max_replicas, api_replicas)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise StartupError('Ray Serve is not installed: pip install "zimage-server[ray]"') from None
    from zimage_server.deploy.ray_app import build_application

    local = address is None
    ray.init(address=address)
    signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C: remove what we deployed
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(
            build_application(settings, options),
            name=options.app_name,
            route_prefix=options.route_prefix,
        )
        log.info("serving on http://%s:%d through Ray Serve", settings.host, settings.port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if local:
            serve.shutdown()
        else:
            serve.delete(options.app_name)
        ray.shutdown()


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt
