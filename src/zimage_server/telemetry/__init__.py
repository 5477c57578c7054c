"""What operators watch: Prometheus metrics and structured logs."""

from zimage_server.telemetry.metrics import Metrics

__all__ = ["Metrics"]
