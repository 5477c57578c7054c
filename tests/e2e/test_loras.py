"""LoRA adapters per request, through the real server: images, batching, 400s, billing.

One server with keys and batching on; its LoRA folder holds adapters PEFT made against the
tiny model's transformer, in diffusers' and a kohya-style layout, and files that must be
refused. Every refusal is a 400 naming ``loras`` and leaves the balance as it was.
"""

from __future__ import annotations

import base64
import io
import pickle
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import ADMIN, InProcessServer, create_key, shared_tiny_model
from tests.loras import (
    ATTENTION,
    FEED_FORWARD,
    adapter_weights,
    save_diffusers,
    save_kohya,
    save_mismatched,
)

STEPS = 2
SURCHARGE = 0.5


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    folder = tmp_path_factory.mktemp("loras")
    installed, model = folder / "installed", shared_tiny_model()
    a = adapter_weights(model, ATTENTION, rank=4, seed=1)
    save_diffusers(a, installed / "style-a")
    save_kohya(a, installed / "style-a-kohya.safetensors")
    save_diffusers(adapter_weights(model, FEED_FORWARD, rank=8, seed=2), installed / "style-b")
    save_mismatched(installed / "wide.safetensors")
    huge = {name: weight * 1e30 for name, weight in a.items()}  # fits, and overflows the render
    save_diffusers(huge, installed / "overflow")
    (installed / "pickled.bin").write_bytes(pickle.dumps({"lora_A": [1.0]}))
    (installed / "fake.safetensors").write_bytes(pickle.dumps({"lora_A": [1.0]}))
    (folder / "secret.safetensors").write_bytes(b"outside the LoRA folder")
    env = {
        "ZIMAGE_AUTH": "true",
        "ZIMAGE_ADMIN_TOKEN": ADMIN,
        "ZIMAGE_LORA_DIR": str(installed),
        "ZIMAGE_LORA_MAX_RANK": "8",
        "ZIMAGE_PRICE_LORA_SURCHARGE": str(SURCHARGE),
        "ZIMAGE_MAX_BATCH_SIZE": "4",
        "ZIMAGE_BATCH_WAIT_MS": "300",
        "ZIMAGE_DEFAULT_MAX_IN_FLIGHT": "16",
    }
    server = InProcessServer(folder / "data", env=env)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(lora_server: InProcessServer) -> str:
    return create_key(lora_server, ADMIN, credits=100)


def post(server: InProcessServer, key: str, seed: int = 5, **extra: Any) -> requests.Response:
    body = {"prompt": "a cat", "seed": seed, "width": 256, "height": 256, "steps": STEPS}
    body |= {"image_format": "png", "base_64": True, **extra}
    return server.post(body, headers={"x-api-key": key})


def image(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["image"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def balance(server: InProcessServer, key: str) -> str:
    prefix = key.split("_")[1]
    url = f"{server.url}/admin/keys/{prefix}/usage"
    r = requests.get(url, headers={"x-admin-token": ADMIN}, timeout=10)
    assert r.status_code == 200, r.text
    return str(r.json()["balance"])


def test_loras_change_the_image_scale_and_combine(lora_server: InProcessServer, key: str) -> None:
    first = post(lora_server, key)
    plain = image(first)
    r = post(lora_server, key, loras=[{"path": "style-a"}])
    with_a = image(r)
    assert "lora_load" in r.json()["timings"] and "lora_load" not in first.json()["timings"]
    price = float(first.headers["x-credits-consumed"])
    charged = float(r.headers["x-credits-consumed"])
    assert charged == pytest.approx(price * (1 + SURCHARGE), abs=1e-6)
    kohya = image(post(lora_server, key, loras=[{"path": "style-a-kohya", "scale": 1}]))
    both = image(post(lora_server, key, loras=[{"path": "style-a"}, {"path": "style-b"}]))
    off = image(post(lora_server, key, loras=[{"path": "style-a", "scale": 0}]))
    again = image(post(lora_server, key))

    assert np.abs(with_a - plain).max() > 8
    assert np.abs(kohya - with_a).max() <= 1  # the kohya layout is converted to the same
    assert np.abs(both - with_a).max() > 8
    assert np.array_equal(off, plain) and np.array_equal(again, plain)


def test_batches_never_mix_adapter_sets(lora_server: InProcessServer, key: str) -> None:
    sets: list[list[dict[str, Any]]] = [[], [{"path": "style-a"}], [{"path": "style-a"}], []]
    singles = [image(post(lora_server, key, seed=20 + i, loras=s)) for i, s in enumerate(sets)]
    with ThreadPoolExecutor(len(sets)) as pool:
        replies = list(pool.map(lambda i: post(lora_server, key, 20 + i, loras=sets[i]), range(4)))
    for single, reply in zip(singles, replies, strict=True):
        assert np.abs(image(reply) - single).max() <= 2
    passes = [reply.json()["transformer_passes"] for reply in replies]
    # Two batches of two (one per adapter set), or smaller: never all four together.
    assert all(p <= 2 * STEPS for p in passes), passes


@pytest.mark.parametrize(
    ("loras", "says"),
    [
        ([{"path": "missing"}], "'missing' is not installed"),
        ([{"path": "../secret"}], "is not a valid name"),
        ([{"path": "/etc/passwd"}], "is not a valid name"),
        ([{"path": "pickled"}], "only .safetensors adapters are accepted"),
        ([{"path": "fake"}], "is not a valid safetensors file"),
        ([{"path": "wide"}], "'wide' does not match this model"),
        ([{"path": "overflow"}], "overflowed (NaN or infinite values) with the LoRA adapters"),
        ([{"path": "style-a"}] * 4, "at most 3 (ZIMAGE_MAX_LORAS); got 4"),
        ([{"path": "style-a", "scale": 4.5}], "'loras[0].scale': must be a number from 0 to 4"),
        ([{"path": "https://example.com/a.safetensors"}], "URLs are off on this server"),
    ],
)
def test_bad_adapters_are_a_400_naming_them_and_cost_nothing(
    lora_server: InProcessServer, key: str, loras: list[dict[str, Any]], says: str
) -> None:
    before = balance(lora_server, key)
    r = post(lora_server, key, loras=loras)
    assert r.status_code == 400, r.text
    assert says in r.text and "loras" in r.text
    assert balance(lora_server, key) == before


def test_the_installed_adapters_are_listed(lora_server: InProcessServer, key: str) -> None:
    r = requests.get(lora_server.url + "/v1/loras", headers={"x-api-key": key}, timeout=10)
    assert r.status_code == 200, r.text
    names = [lora["name"] for lora in r.json()["loras"]]
    assert names == ["fake", "overflow", "style-a", "style-a-kohya", "style-b", "wide"]
    assert r.json()["max_loras"] == 3 and r.json()["urls_allowed"] is False


def test_the_openai_endpoint_takes_loras(lora_server: InProcessServer, key: str) -> None:
    body = {"prompt": "a cat", "size": "256x256", "seed": 5, "num_inference_steps": STEPS}
    url = lora_server.url + "/v1/images/generations"
    headers = {"authorization": f"Bearer {key}"}
    plain = requests.post(url, json=body, headers=headers, timeout=60)
    styled = requests.post(
        url, json={**body, "loras": [{"path": "style-a"}]}, headers=headers, timeout=60
    )
    assert plain.status_code == styled.status_code == 200, styled.text
    assert plain.json()["data"][0]["b64_json"] != styled.json()["data"][0]["b64_json"]
    bad = requests.post(
        url, json={**body, "loras": [{"path": "nope"}]}, headers=headers, timeout=60
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "loras"


def test_the_cli_takes_lora_name_and_scale(
    lora_server: InProcessServer, key: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from zimage_server.cli import app

    def run(*extra: str) -> np.ndarray:
        out = tmp_path / f"out{len(extra)}.png"
        args = ["generate", "a cat", "-o", str(out), "--url", lora_server.url]
        args += ["--api-key", key, "--seed", "5", "--width", "256", "--height", "256"]
        result = CliRunner().invoke(app, [*args, "--steps", str(STEPS), *extra])
        assert result.exit_code == 0, result.output
        return np.asarray(Image.open(out).convert("RGB")).astype(np.int16)

    assert np.abs(run("--lora", "style-a:1.5") - run()).max() > 8


def run_job(server: InProcessServer, key: str, loras: list[dict[str, Any]]) -> dict[str, Any]:
    """A v2 job to its end: the final body, polled as a client would."""
    body = {"prompt": "a cat", "seed": 5, "width": 256, "height": 256, "steps": STEPS}
    body |= {"image_format": "png", "base_64": True, "loras": loras}
    submitted = server.post(body, "/v2/z-image-turbo", headers={"x-api-key": key})
    assert submitted.status_code == 202, submitted.text
    url, deadline = submitted.json()["response_url"], time.monotonic() + 60
    while True:
        r = requests.get(url, headers={"x-api-key": key}, timeout=10)
        if r.json()["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
            return dict(r.json())
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)


def test_a_v2_job_renders_with_loras_and_a_refused_adapter_is_refunded(
    lora_server: InProcessServer, key: str
) -> None:
    plain = image(post(lora_server, key))
    done = run_job(lora_server, key, [{"path": "style-a"}])
    assert done["status"] == "COMPLETED", done
    with_a = image(post(lora_server, key, loras=[{"path": "style-a"}]))
    job_image = np.asarray(
        Image.open(io.BytesIO(base64.b64decode(done["output"]))).convert("RGB")
    ).astype(np.int16)
    assert np.abs(job_image - with_a).max() <= 1 and np.abs(job_image - plain).max() > 8

    before = balance(lora_server, key)
    failed = run_job(lora_server, key, [{"path": "wide"}])  # passes the API, not the worker
    assert failed["status"] == "FAILED" and "'wide' does not match this model" in str(failed)
    assert balance(lora_server, key) == before  # held at submission, refunded at the refusal


def scrape(server: InProcessServer) -> dict[str, float]:
    text = requests.get(server.url + "/metrics", timeout=10).text
    pairs = (line.rpartition(" ") for line in text.splitlines() if not line.startswith("#"))
    return {series: float(value) for series, _, value in pairs if series}


def test_adapter_cache_metrics_move_on_real_requests(
    lora_server: InProcessServer, key: str
) -> None:
    """A new adapter is a miss (read from disk, timed); the same one at another scale is
    a hit (kept loaded); the worker's gauges show it held."""
    installed = lora_server.data_dir.parent / "installed"
    source = installed / "style-b" / "pytorch_lora_weights.safetensors"
    shutil.copy(source, installed / "metered.safetensors")  # a file no request read yet
    image(post(lora_server, key))  # reports what a refused adapter's failed batch counted
    before = scrape(lora_server)
    image(post(lora_server, key, loras=[{"path": "metered"}]))
    image(post(lora_server, key, loras=[{"path": "metered", "scale": 0.5}]))
    after = scrape(lora_server)

    def moved(series: str) -> float:
        return after[series] - before.get(series, 0.0)

    assert moved('zimage_adapter_cache_lookups_total{result="miss"}') == 1
    assert moved('zimage_adapter_cache_lookups_total{result="hit"}') == 1
    assert moved("zimage_adapter_cache_evictions_total") == 0
    assert moved("zimage_adapter_load_seconds_count") == 1
    assert moved("zimage_adapter_load_seconds_sum") > 0
    assert after['zimage_adapters_loaded{worker="worker-0"}'] >= 1
    assert after['zimage_adapter_bytes{worker="worker-0"}'] >= source.stat().st_size / 2
