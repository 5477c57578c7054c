"""Build the Serve application: ``EngineReplica`` (GPU) bound into ``ApiIngress`` (HTTP).

``serve run zimage_server.deploy.ray_app:build_app min_replicas=0 max_replicas=4`` or a
config file (``deploy/ray/serve.yaml``) calls ``build_app(args)``; ``zimage serve --ray``
calls ``build_application`` with the settings it parsed. Settings come from ``ZIMAGE_*``
env vars where the application is built (a config file's ``runtime_env.env_vars``) and travel
to every replica with the application, so all replicas share one configuration.
"""

from __future__ import annotations

from typing import Any, cast

from zimage_server.core.config import Settings
from zimage_server.deploy.options import RayOptions


def build_application(settings: Settings, options: RayOptions) -> Any:
    """The bound Serve application (``serve.run`` takes it)."""
    from zimage_server.deploy.ingress import ApiIngress
    from zimage_server.deploy.replica import EngineReplica

    if settings.tiny:
        _ensure_tiny_model(settings)
    ongoing = options.ongoing_limit(settings.max_batch_size)
    engine_options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": options.num_gpus, "num_cpus": options.num_cpus},
        "max_ongoing_requests": ongoing,
        # Beyond the API's own bound nothing should queue; past it Serve raises
        # BackPressureError, which the ingress turns into 429. Serve counts this in each
        # caller's router, as each ingress replica counts ZIMAGE_MAX_QUEUE: both bounds are
        # per ingress replica (deploy/README.md).
        "max_queued_requests": max(settings.max_queue, 1),
    }
    if options.replicas is not None:
        engine_options["num_replicas"] = options.replicas
    else:
        engine_options["autoscaling_config"] = options.autoscaling_config()
    # mypy does not apply class decorators: both names are Serve ``Deployment`` objects.
    engine = cast(Any, EngineReplica).options(**engine_options).bind(settings, ongoing)
    ingress = cast(Any, ApiIngress).options(
        max_ongoing_requests=max(256, 4 * settings.max_queue), **options.ingress_scaling()
    )
    return ingress.bind(engine, settings, options)


def build_app(args: dict[str, Any]) -> Any:
    """Entry point for ``serve run`` and Serve config files; ``args`` are ``RayOptions``."""
    return build_application(Settings(), RayOptions.model_validate(args))


def _ensure_tiny_model(settings: Settings) -> None:
    """Build the tiny model once here, so that replicas do not race to write it."""
    if not (settings.tiny_model_dir / "model_index.json").exists():
        from zimage_server.engine.tiny import build_tiny_model

        build_tiny_model(settings.tiny_model_dir)
