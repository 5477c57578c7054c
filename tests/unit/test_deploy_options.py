"""The Ray deployment files ask for several ingress replicas, and the options accept them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from zimage_server.deploy.options import RayOptions

ROOT = Path(__file__).resolve().parents[2]


def _apps() -> list[dict[str, Any]]:
    serve = yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text())
    kuberay = yaml.safe_load((ROOT / "deploy/kuberay/rayservice.yaml").read_text())
    inner = yaml.safe_load(kuberay["spec"]["serveConfigV2"])
    return [*serve["applications"], *inner["applications"]]


@pytest.mark.parametrize("app", _apps(), ids=["serve.yaml", "rayservice.yaml"])
def test_deploy_files_run_several_ingress_replicas(app: dict[str, Any]) -> None:
    options = RayOptions.model_validate(app["args"])
    assert options.ingress_scaling()["autoscaling_config"]["min_replicas"] >= 2
    ingress = next(d for d in app["deployments"] if d["name"] == "ApiIngress")
    assert "num_replicas" not in ingress  # it would override the args


def test_ingress_scaling_options() -> None:
    assert RayOptions(api_replicas=3).ingress_scaling() == {"num_replicas": 3}
    with pytest.raises(ValueError, match="api_max_replicas"):
        RayOptions(api_replicas=3, api_max_replicas=2)
