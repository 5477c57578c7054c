"""The container image, built and run for real with podman (Dockerfile, deploy/README.md).

No container registry is reachable from CI, so the image is built on a Debian base that
``scripts/build-base-image`` makes with debootstrap from Debian's packages (the stand-in for
the default ``debian:bookworm-slim``). PyTorch is the CPU build: from a local folder of wheels
when pip is configured with one (CI's machines), else from PyTorch's CPU index (the
Dockerfile's CPU variant). Then the tiny model is served in the container, published on
127.0.0.1 only.

Needs root, podman and debootstrap (``.ci/run`` installs them); skipped otherwise.
Podman's layer cache keeps a rebuild after a source change to seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/zimage-server:test"
BASE_IMAGE = "localhost/zimage-base:bookworm"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

_missing = [tool for tool in ("podman", "debootstrap") if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(
        bool(_missing) or os.geteuid() != 0,
        reason=f"needs root, podman and debootstrap (apt-get install podman debootstrap runc);"
        f" missing: {', '.join(_missing) or 'root'}",
    ),
]


def _podman_env(tmp: Path) -> dict[str, str]:
    """podman's environment. Where containers may not raise their rlimits (these machines),
    podman's default ulimits make every container fail to start; clearing them lets the
    runtime (runc) inherit podman's own. An operator's CONTAINERS_CONF wins."""
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env:
        conf = tmp / "containers.conf"
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        env["CONTAINERS_CONF"] = str(conf)
    return env


def _pip_setting(name: str) -> str:
    """A pip setting of this machine (environment first, then pip's config files)."""
    value = os.environ.get(f"PIP_{name.upper().replace('-', '_')}")
    if value:
        return value
    found = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", f"global.{name}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.strip() if found.returncode == 0 else ""


def _build_args() -> list[str]:
    """Carry this machine's pip setup into the build: its local wheels (mounted read-only)
    and the CA of a TLS-inspecting proxy. Without a local torch wheel, the CPU variant."""
    args: list[str] = []
    folders = [Path(p) for p in _pip_setting("find-links").split() if Path(p).is_dir()]
    for folder in folders:
        args += ["--volume", f"{folder}:{folder}:ro"]
    if folders:
        args += ["--build-arg", f"PIP_FIND_LINKS={' '.join(map(str, folders))}"]
    if not any(next(folder.glob("torch-*+cpu-*.whl"), None) for folder in folders):
        args += ["--build-arg", f"TORCH_INDEX_URL={CPU_INDEX}"]
    cert = _pip_setting("cert")
    if cert and Path(cert).is_file():
        args += ["--volume", f"{cert}:/etc/zimage-build-ca.pem:ro"]
        args += ["--build-arg", "PIP_CERT=/etc/zimage-build-ca.pem"]
    return args


def _run(
    command: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _podman_env(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def image(podman_env: dict[str, str]) -> dict[str, Any]:
    """Build the image (the base once per machine, then podman's layer cache) and return
    its inspected config (with its healthcheck)."""
    base = _run(["bash", str(ROOT / "scripts" / "build-base-image"), BASE_IMAGE], podman_env, 600)
    assert base.returncode == 0, base.stderr[-3000:]
    started = time.monotonic()
    build = _run(
        [
            "podman",
            "build",
            "--format=docker",  # OCI images drop HEALTHCHECK
            "--network=host",
            "--build-arg",
            f"BASE_IMAGE={BASE_IMAGE}",
            *_build_args(),
            "--tag",
            IMAGE,
            str(ROOT),
        ],
        podman_env,
        900,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    print(f"image built in {time.monotonic() - started:.0f} s")  # noqa: T201
    inspected = _run(["podman", "image", "inspect", IMAGE], podman_env)
    assert inspected.returncode == 0, inspected.stderr
    found: dict[str, Any] = json.loads(inspected.stdout)[0]
    return {**found["Config"], "Healthcheck": found["Healthcheck"]}  # podman keeps it apart


@pytest.fixture(scope="module")
def container(image: dict[str, Any], podman_env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """The image serving the tiny model, published on 127.0.0.1; (container id, base URL)."""
    port = _free_port()
    name = f"zimage-test-{uuid.uuid4().hex[:8]}"
    started = _run(
        [
            "podman",
            "run",
            "--detach",
            "--name",
            name,
            "--publish",
            f"127.0.0.1:{port}:8000",
            "--env",
            "ZIMAGE_TINY=true",
            "--env",
            "ZIMAGE_WARMUP_SIZE=256",
            "--env",
            "ZIMAGE_LOG_FORMAT=text",
            IMAGE,
        ],
        podman_env,
    )
    assert started.returncode == 0, started.stderr
    try:
        yield name, f"http://127.0.0.1:{port}"
    finally:
        logs = _run(["podman", "logs", name], podman_env)
        print(logs.stdout[-3000:], logs.stderr[-3000:])  # noqa: T201  (shown on failure)
        _run(["podman", "rm", "--force", "--time", "5", name], podman_env)


def _wait_ready(base_url: str, timeout_s: float = 240) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/readyz", timeout=5)
            if response.status_code == 200:
                return response
            last = response.text
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(1)
    raise AssertionError(f"/readyz not 200 after {timeout_s} s: {last}")


@pytest.mark.timeout(1200)
def test_image_declares_user_volumes_healthcheck(image: dict[str, Any]) -> None:
    assert image["User"] == "10001:10001"
    assert set(image["Volumes"]) == {"/data", "/cache"}
    assert "8000/tcp" in image["ExposedPorts"]
    assert any("/readyz" in part for part in image["Healthcheck"]["Test"])
    env = dict(item.split("=", 1) for item in image["Env"])
    assert env["ZIMAGE_DATA_DIR"] == "/data"
    assert env["HF_HOME"].startswith("/cache/")


@pytest.mark.timeout(600)
def test_container_serves_tiny_model(
    container: tuple[str, str], podman_env: dict[str, str]
) -> None:
    name, base_url = container
    ready = _wait_ready(base_url)
    assert ready.json()["status"] == "READY"

    response = httpx.post(
        f"{base_url}/v1/z-image-turbo",
        json={"prompt": "a lighthouse at dawn", "width": 256, "height": 256, "steps": 2},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"].startswith(f"{base_url}/v1/outputs/")
    image = httpx.get(body["image"], timeout=30)
    assert image.status_code == 200
    assert image.content[:4] == b"RIFF" and image.content[8:12] == b"WEBP"

    # The image's own HEALTHCHECK passes once ready.
    health = _run(["podman", "healthcheck", "run", name], podman_env)
    assert health.returncode == 0, health.stdout + health.stderr


@pytest.mark.timeout(600)
def test_container_runs_as_non_root(container: tuple[str, str], podman_env: dict[str, str]) -> None:
    name, base_url = container
    _wait_ready(base_url)
    # Every process in the container (tini, the API, its worker) and the files it wrote.
    probe = (
        "import glob, os\n"
        "uids = set()\n"
        "for status in glob.glob('/proc/[0-9]*/status'):\n"
        "    try:\n"
        "        uids |= {int(l.split()[1]) for l in open(status) if l.startswith('Uid:')}\n"
        "    except OSError:\n"
        "        pass\n"
        "print(sorted(uids), len(glob.glob('/proc/[0-9]*')))\n"
        "print(sorted({os.stat(os.path.join(d, f)).st_uid\n"
        "      for d, _, fs in os.walk('/data') for f in fs}))\n"
    )
    result = _run(["podman", "exec", name, "python", "-c", probe], podman_env)
    assert result.returncode == 0, result.stderr
    process_uids, file_uids = result.stdout.splitlines()
    assert process_uids.startswith("[10001]"), result.stdout
    assert file_uids == "[10001]", result.stdout
    # KubeRay runs `bash -lc`: a login shell (Debian's /etc/profile resets PATH) finds zimage.
    login = _run(["podman", "exec", name, "bash", "-lc", "command -v zimage"], podman_env)
    assert login.stdout.strip() == "/opt/zimage/bin/zimage", login.stdout + login.stderr
