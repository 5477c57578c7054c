"""compose.yaml and the files it mounts, checked as files (no registry is reachable to pull
PostgreSQL, Prometheus or Grafana), and the Dockerfile through hadolint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's ``!reset`` / ``!override`` merge tags."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> object:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _tagged)


def _load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # noqa: S506  (a SafeLoader)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = _load(ROOT / "compose.yaml")
    return loaded


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts.append((ROOT / source, target))
    return mounts


def test_compose_runs_server_postgres_prometheus_grafana(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"server", "postgres", "prometheus", "grafana"}
    server = services["server"]
    assert (ROOT / server["build"]["context"] / "Dockerfile").is_file()
    assert server["environment"]["ZIMAGE_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@postgres:5432/" in server["environment"]["ZIMAGE_DATABASE_URL"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert {volume.split(":")[1] for volume in server["volumes"]} == {"/cache", "/data"}
    for name, service in services.items():
        # Fully qualified images (podman asks which registry otherwise); ours is built.
        assert "build" in service or service["image"].startswith("docker.io/"), name
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for source, _ in _bind_mounts(service):
            assert source.exists(), f"{name} mounts {source}, which does not exist"
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])}
    assert {v for v in named if not v.startswith(".")} == set(compose["volumes"])


def test_prometheus_scrapes_the_server(compose: dict[str, Any]) -> None:
    mounts = dict((t, s) for s, t in _bind_mounts(compose["services"]["prometheus"]))
    config = _load(mounts["/etc/prometheus/prometheus.yml"])
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["server:8000"]


def test_grafana_provisions_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict((t, s) for s, t in _bind_mounts(grafana))
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = _load(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True
    (provider,) = _load(provisioning / "dashboards" / "zimage.yaml")["providers"]
    folder = provider["options"]["path"]
    dashboards = [s for t, s in mounts.items() if t.startswith(folder + "/")]
    assert dashboards == [ROOT / "deploy" / "grafana-dashboard.json"]
    dashboard = json.loads(dashboards[0].read_text())
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].endswith(".json")
    assert dashboard["uid"] == "zimage-server"


def test_cpu_override_drops_the_gpu(compose: dict[str, Any]) -> None:
    assert compose["services"]["server"]["deploy"]["resources"]["reservations"]["devices"]
    override = _load(ROOT / "deploy" / "compose.cpu.yaml")["services"]["server"]
    assert override["deploy"] == {}  # !reset
    assert override["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert override["environment"]["ZIMAGE_TINY"] == "true"


def test_kuberay_manifest_names_the_image() -> None:
    manifest = _load(ROOT / "deploy" / "kuberay" / "rayservice.yaml")
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    (worker,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    images = {head["containers"][0]["image"], worker["template"]["spec"]["containers"][0]["image"]}
    assert images == {"zimage-server:ray"}
    for spec in (head, worker["template"]["spec"]):
        assert spec["securityContext"]["runAsUser"] == 10001


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint missing (pip install -e '.[dev]')")
def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    assert hadolint is not None
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
