"""How the engine is deployed on Ray Serve: replica counts, autoscaling and resources.

Parsed from ``serve run ... key=value`` arguments (strings) or a config file's ``args``, so
every field has a default and a constraint; bad values stop the deploy with a clear message.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

ENGINE_DEPLOYMENT = "EngineReplica"
INGRESS_DEPLOYMENT = "ApiIngress"


class RayOptions(BaseModel):
    """Deployment options; ``replicas`` fixes the count, otherwise it autoscales."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replicas: int | None = Field(
        None, ge=1, description="Fixed number of engine replicas (no autoscaling)."
    )
    min_replicas: int = Field(1, ge=0, description="0 scales to zero when idle.")
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Queued plus running requests per replica the autoscaler aims at."
    )
    downscale_delay_s: float = Field(60.0, ge=0, description="Idle time before removing one.")
    upscale_delay_s: float = Field(3.0, ge=0, description="Sustained load before adding one.")
    metrics_interval_s: float = Field(1.0, gt=0, description="How often load is reported.")
    look_back_period_s: float = Field(5.0, gt=0, description="Window the autoscaler averages.")
    num_gpus: float = Field(1.0, ge=0, description="GPUs per engine replica (0 on CPU).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per engine replica.")
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Requests one replica holds at once (default: twice the batch size); "
        "the rest wait in Serve's queue and go to whichever replica frees up first.",
    )
    replica_retries: int = Field(
        1, ge=0, le=3, description="Re-sends of a render whose replica died (deadline allowing)."
    )
    api_replicas: int = Field(
        2,
        ge=1,
        description="ApiIngress replicas (HTTP, encoding, billing); any number share "
        "the store, Redis and the bucket.",
    )
    api_max_replicas: int | None = Field(
        None, ge=1, description="Above api_replicas: autoscale the ingress up to this."
    )
    api_target_ongoing_requests: float = Field(
        32.0, gt=0, description="Requests in flight per ingress replica the autoscaler aims at."
    )
    app_name: str = "zimage"
    route_prefix: str = "/"

    @model_validator(mode="after")
    def _bounds(self) -> RayOptions:
        if self.replicas is None and self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        if self.api_max_replicas is not None and self.api_max_replicas < self.api_replicas:
            raise ValueError(
                f"api_max_replicas ({self.api_max_replicas}) is below api_replicas "
                f"({self.api_replicas})"
            )
        return self

    def ingress_scaling(self) -> dict[str, Any]:
        """``num_replicas``, or an autoscaling config on requests in flight (request rate
        times latency) between ``api_replicas`` and ``api_max_replicas``."""
        if self.api_max_replicas is None or self.api_max_replicas == self.api_replicas:
            return {"num_replicas": self.api_replicas}
        return {
            "autoscaling_config": {
                "min_replicas": self.api_replicas,
                "max_replicas": self.api_max_replicas,
                "target_ongoing_requests": self.api_target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            }
        }

    @property
    def scales_to_zero(self) -> bool:
        return self.replicas is None and self.min_replicas == 0

    def ongoing_limit(self, max_batch_size: int) -> int:
        return self.max_ongoing_requests or max(2, 2 * max_batch_size)

    def autoscaling_config(self) -> dict[str, Any] | None:
        if self.replicas is not None:
            return None
        config: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "downscale_delay_s": self.downscale_delay_s,
            "upscale_delay_s": self.upscale_delay_s,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": self.look_back_period_s,
        }
        if self.initial_replicas is not None:
            config["initial_replicas"] = self.initial_replicas
        return config
