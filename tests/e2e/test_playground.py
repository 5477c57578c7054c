"""The playground at ``/`` in a real headless Chromium, against the real tiny server.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package. Without
them the tests skip locally and fail in CI (``CI`` set), which installs them. Screenshots go
to ``artifacts/`` under the repository root (git-ignored).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from tests.conftest import ADMIN, ROOT, InProcessServer

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

ARTIFACTS = ROOT / "artifacts"
# Chromium as root on a machine with a closed network: no sandbox, and nothing in the
# background that would try (and hang) to reach the internet.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--force-device-scale-factor=1",
    # Headless Chromium has no pointing device; say it has a mouse, as a desktop does, so
    # (hover: hover) and (pointer: fine) match until a test emulates a touch screen.
    "--blink-settings=primaryPointerType=4,availablePointerTypes=4,primaryHoverType=2,availableHoverTypes=2",
]
WAIT_S = 90


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [
        name for name, found in [("chromium", chromium), ("chromedriver", driver)] if found is None
    ]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        reason = (
            f"the playground browser test needs {', '.join(missing)}: "
            "apt-get install -y chromium chromium-driver && pip install selenium"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    assert chromium is not None and driver is not None
    return chromium, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(WAIT_S)
    viewport(driver, 1440, 900)
    try:
        yield driver
    finally:
        driver.quit()


# ---------- helpers ----------


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(
        condition, message=f"timed out waiting for {what}"
    )


def viewport(driver: WebDriver, width: int, height: int, mobile: bool = False) -> None:
    """An exact CSS viewport (a window size would include the browser's own frame)."""
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)  # type: ignore[attr-defined]


def by_id(driver: WebDriver, element_id: str) -> WebElement:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def open_page(driver: WebDriver, url: str) -> None:
    driver.get(url + "/")
    wait_for(
        driver,
        lambda d: d.execute_script("return document.body.dataset.ready") == "true",
        "GET /info to load",
    )


def set_value(element: WebElement, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.DELETE)
    element.send_keys(text)


def result_size(driver: WebDriver) -> tuple[int, int] | None:
    size = driver.execute_script(
        "const img = document.getElementById('result');"
        "return img.hidden || !img.complete || !img.src.startsWith('blob:') ? null"
        " : [img.naturalWidth, img.naturalHeight];"
    )
    return None if size is None else (int(size[0]), int(size[1]))


def wait_for_image(driver: WebDriver, width: int, height: int) -> None:
    try:
        wait_for(
            driver,
            lambda d: (
                result_size(d) == (width, height)
                and d.execute_script("return !document.getElementById('generate').disabled")
            ),
            f"a loaded {width}x{height} result",
        )
    except Exception as exc:
        screenshot(driver, "playground-failure.png")
        shown = driver.execute_script("return document.getElementById('error').innerText")
        raise AssertionError(f"{exc}; the page shows: {shown!r}") from exc


def history(driver: WebDriver) -> list[WebElement]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#history .history-item")


def watch_busy(driver: WebDriver) -> None:
    """Record whether the Generate button ever turns disabled and busy (it can be brief)."""
    driver.execute_script(
        "window.__busySeen = false;"
        "const button = document.getElementById('generate');"
        "new MutationObserver(() => {"
        "  if (button.disabled && button.getAttribute('aria-busy') === 'true')"
        "    window.__busySeen = true;"
        "}).observe(button, {attributes: true});"
    )


def screenshot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    assert driver.save_screenshot(str(path)), f"could not write {path}"
    return path


def requests_sent(driver: WebDriver, origin: str) -> list[dict[str, Any]]:
    """Every request our page sent, from Chromium's performance (DevTools) log.

    Chromium's own pages (the initial new-tab page, ``chrome://``) are not ours: only the
    requests of documents loaded from ``origin``, and the navigations to them, count.
    """
    sent = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] != "Network.requestWillBeSent":
            continue
        params = message["params"]
        if params.get("documentURL", "").startswith(origin + "/"):
            sent.append(params["request"])
    assert sent, "no requests recorded from the page"
    return sent


def assert_no_console_errors(driver: WebDriver, allowed: tuple[str, ...] = ()) -> None:
    severe = [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and not any(text in entry["message"] for text in allowed)
    ]
    assert not severe, severe


# ---------- tests ----------


def test_generate_custom_size_reuse_seed_and_history(
    browser: WebDriver, server: InProcessServer
) -> None:
    from selenium.webdriver.common.keys import Keys

    driver = browser
    open_page(driver, server.url)
    assert driver.title == "Z-Image playground"
    assert driver.execute_script("return document.body.dataset.auth") == "off"
    assert not by_id(driver, "key-button").is_displayed()
    wait_for(driver, lambda d: by_id(d, "status").get_attribute("data-state") == "ready", "READY")

    # A preset, then the Generate button.
    by_id(driver, "prompt").send_keys("a lighthouse at dawn, volumetric fog, 35mm film")
    driver.find_element("css selector", '.preset[data-w="512"][data-h="512"]').click()
    assert by_id(driver, "width").get_attribute("value") == "512"
    assert by_id(driver, "height").get_attribute("value") == "512"
    driver.find_element("css selector", 'input[name="format"][value="png"]').click()
    watch_busy(driver)
    by_id(driver, "generate").click()
    wait_for_image(driver, 512, 512)
    assert driver.execute_script("return window.__busySeen"), "no busy state while generating"
    assert by_id(driver, "error").is_displayed() is False

    seed = by_id(driver, "result-seed").text
    assert re.fullmatch(r"\d+", seed), seed
    assert int(seed) < 2**31
    assert re.fullmatch(r"\d+\.\d+ s server · \d+\.\d+ s total", by_id(driver, "result-time").text)
    assert by_id(driver, "result-size").text == "512 × 512"
    assert by_id(driver, "result-format").text == "PNG"
    download = by_id(driver, "download")
    assert download.get_attribute("href").startswith("blob:" + server.url)
    assert download.get_attribute("download") == f"zimage-{seed}.png"
    items = history(driver)
    assert len(items) == 1
    assert f"{seed} · 512×512" in items[0].text
    assert "a lighthouse at dawn" in items[0].text

    # "Reuse seed", a custom size that is not a multiple of 16, and Ctrl+Enter.
    by_id(driver, "reuse-seed").click()
    assert by_id(driver, "seed").get_attribute("value") == seed
    assert not by_id(driver, "seed-random").is_selected()
    set_value(by_id(driver, "width"), "328")
    set_value(by_id(driver, "height"), "264")
    pressed = driver.find_elements("css selector", '.preset[aria-pressed="true"]')
    assert pressed == []
    by_id(driver, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    wait_for_image(driver, 328, 264)
    assert by_id(driver, "result-seed").text == seed  # the server rendered the reused seed
    assert len(history(driver)) == 2
    assert f"{seed} · 328×264" in history(driver)[0].text
    path = screenshot(driver, "playground.png")
    assert path.stat().st_size > 10_000

    # History is small (thumbnails, not full images), survives a reload, and restores.
    stored = driver.execute_script(
        "return JSON.parse(localStorage.getItem('zimage.playground.history'))"
    )
    assert [entry["seed"] for entry in stored] == [seed, seed]
    assert all(entry["thumb"].startswith("data:image/jpeg;base64,") for entry in stored)
    assert all(len(entry["thumb"]) < 40_000 for entry in stored)
    open_page(driver, server.url)
    assert len(history(driver)) == 2
    history(driver)[1].click()
    assert by_id(driver, "width").get_attribute("value") == "512"
    assert by_id(driver, "height").get_attribute("value") == "512"
    assert by_id(driver, "seed").get_attribute("value") == seed
    assert by_id(driver, "preview-badge").is_displayed()
    assert by_id(driver, "result-seed").text == seed

    # A bad custom size is refused in the page, clearly, before any request.
    set_value(by_id(driver, "width"), "100")
    by_id(driver, "generate").click()
    assert by_id(driver, "error").is_displayed()
    assert "256 to 2048" in by_id(driver, "error").text
    assert by_id(driver, "width").get_attribute("aria-invalid") == "true"

    # Responsive: nothing overflows sideways on a phone-sized window.
    set_value(by_id(driver, "width"), "512")
    assert not by_id(driver, "error").is_displayed()  # fixing the field clears it
    viewport(driver, 390, 844, mobile=True)
    assert driver.execute_script(
        "return document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )
    driver.execute_script("document.getElementById('stage').scrollIntoView()")
    screenshot(driver, "playground-mobile.png")

    # Only this origin was ever contacted, and the page logged no errors (CSP included).
    urls = [request["url"] for request in requests_sent(driver, server.url)]
    assert any(url.endswith("/v1/z-image-turbo") for url in urls), urls
    assert all(url.startswith((server.url + "/", "blob:", "data:")) for url in urls), urls
    assert_no_console_errors(driver)


def test_api_key_is_asked_for_and_sent_only_here(
    browser: WebDriver, auth_server: InProcessServer
) -> None:
    created = requests.post(
        auth_server.url + "/admin/keys",
        headers={"x-admin-token": ADMIN},
        json={"name": "pg", "credits": 10},
        timeout=30,
    )
    assert created.status_code == 201, created.text
    key = created.json()["key"]

    driver = browser
    open_page(driver, auth_server.url)
    assert driver.execute_script("return document.body.dataset.auth") == "required"
    dialog = by_id(driver, "key-dialog")
    wait_for(driver, lambda d: dialog.get_attribute("open") is not None, "the key dialog")
    screenshot(driver, "playground-key-dialog.png")

    # A wrong key: the server's 401 {"error": ...} is shown and the dialog asks again.
    by_id(driver, "key-input").send_keys("zk_00000000_wrong")
    by_id(driver, "key-save").click()
    assert dialog.get_attribute("open") is None
    by_id(driver, "prompt").send_keys("a red bicycle")
    driver.find_element("css selector", '.preset[data-w="512"][data-h="512"]').click()
    by_id(driver, "generate").click()
    wait_for(driver, lambda d: by_id(d, "error").is_displayed(), "the 401 error")
    assert "(401)" in by_id(driver, "error").text
    wait_for(driver, lambda d: dialog.get_attribute("open") is not None, "the key dialog again")

    # The dialog says how to get a key.
    help_text = by_id(driver, "key-help").text
    assert "zimage keys create --name NAME --credits N" in help_text
    assert "Ask whoever runs this server" in help_text

    # The right key: the request that got the 401 runs again by itself, and gives an image.
    by_id(driver, "key-input").send_keys(key)
    by_id(driver, "key-save").click()
    wait_for_image(driver, 512, 512)
    assert not by_id(driver, "error").is_displayed()
    assert driver.execute_script("return localStorage.getItem('zimage.playground.apiKey')") == key
    assert by_id(driver, "key-button").text.endswith(key[-4:])
    screenshot(driver, "playground-auth.png")

    # The key went only to this server, only as x-api-key, and never in a URL.
    sent = requests_sent(driver, auth_server.url)
    with_key = [r for r in sent if any(v == key for v in r.get("headers", {}).values())]
    assert with_key, "the key was never sent"
    for request in sent:
        assert request["url"].startswith((auth_server.url + "/", "blob:", "data:")), request
        assert key not in request["url"]
    for request in with_key:
        names = [name for name, value in request["headers"].items() if value == key]
        assert [name.lower() for name in names] == ["x-api-key"]

    # Forget it: gone from storage, and the dialog asks for another.
    by_id(driver, "key-button").click()
    by_id(driver, "key-forget").click()
    assert driver.execute_script("return localStorage.getItem('zimage.playground.apiKey')") is None
    assert dialog.get_attribute("open") is not None
    assert_no_console_errors(driver, allowed=("401",))


def status_of(driver: WebDriver) -> tuple[str, str]:
    return (
        by_id(driver, "status").get_attribute("data-state") or "",
        by_id(driver, "status-text").text,
    )


def record_statuses(driver: WebDriver) -> None:
    """Keep every status text the pill shows (some last only one poll)."""
    driver.execute_script(
        "window.__statuses = [];"
        "const text = document.getElementById('status-text');"
        "new MutationObserver(() => window.__statuses.push(text.textContent))"
        "  .observe(text, {childList: true, characterData: true, subtree: true});"
    )


def test_status_follows_the_server_down_and_back(browser: WebDriver, tmp_path: Path) -> None:
    driver = browser
    first = InProcessServer(tmp_path / "first")
    port = int(first.url.rsplit(":", 1)[1])
    try:
        open_page(driver, first.url)
        wait_for(driver, lambda d: status_of(d)[0] == "ready", "Ready")
        record_statuses(driver)
    finally:
        first.stop()

    # Down: the pill says so within one poll, and Generate explains instead of failing vaguely.
    wait_for(driver, lambda d: status_of(d) == ("unreachable", "Server unreachable"), "unreachable")
    by_id(driver, "prompt").send_keys("a lighthouse")
    by_id(driver, "generate").click()
    wait_for(driver, lambda d: by_id(d, "error").is_displayed(), "the error")
    assert by_id(driver, "error-title").text == "Cannot reach the server"
    screenshot(driver, "playground-unreachable.png")

    # Back (same URL): STARTING while the model loads, then Ready, and the error goes.
    second = InProcessServer(tmp_path / "second", port=port, wait=False)
    try:
        driver.execute_script("window.dispatchEvent(new Event('online'))")  # poll now
        wait_for(driver, lambda d: status_of(d)[0] == "ready", "Ready again")
        seen = driver.execute_script("return window.__statuses")
        assert "Starting: loading the model…" in seen, seen
        assert not by_id(driver, "error").is_displayed()
        assert status_of(driver)[1].startswith("Ready")
    finally:
        second.stop()


def test_shortcut_hint_only_with_a_keyboard_and_mouse(
    browser: WebDriver, server: InProcessServer
) -> None:
    driver = browser
    open_page(driver, server.url)
    hint = driver.find_element("css selector", ".hint")
    assert hint.is_displayed() and "Enter" in hint.text

    viewport(driver, 390, 844, mobile=True)
    touch = {"enabled": True, "maxTouchPoints": 5}
    driver.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", touch)  # type: ignore[attr-defined]
    assert driver.execute_script("return matchMedia('(pointer: coarse)').matches")
    assert not hint.is_displayed()
    assert by_id(driver, "generate").is_displayed()


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    from tests.conftest import shared_tiny_model
    from tests.loras import ATTENTION, adapter_weights, save_diffusers

    folder = tmp_path_factory.mktemp("playground-loras")
    weights = adapter_weights(shared_tiny_model(), ATTENTION, rank=4, seed=1)
    save_diffusers(weights, folder / "loras" / "style-a")
    srv = InProcessServer(folder / "data", env={"ZIMAGE_LORA_DIR": str(folder / "loras")})
    yield srv
    srv.stop()


def shown_png(driver: WebDriver) -> bytes:
    """The result image as the page shows it, drawn on a canvas (the page's CSP keeps
    ``fetch`` off its blob URLs)."""
    import base64

    data = driver.execute_script(
        "const img = document.getElementById('result');"
        "const c = document.createElement('canvas');"
        "c.width = img.naturalWidth; c.height = img.naturalHeight;"
        "c.getContext('2d').drawImage(img, 0, 0);"
        "return c.toDataURL('image/png').split(',')[1];"
    )
    return base64.b64decode(data)


def render_once(driver: WebDriver) -> bytes:
    before = driver.execute_script("return document.getElementById('result').src")
    by_id(driver, "generate").click()
    wait_for(
        driver,
        lambda d: (
            d.execute_script("return document.getElementById('result').src") != before
            and d.execute_script("return !document.getElementById('generate').disabled")
            and result_size(d) == (256, 256)
        ),
        "a new 256x256 result",
    )
    return shown_png(driver)


def test_a_lora_picked_in_the_page_is_sent_and_changes_the_image(
    browser: WebDriver, lora_server: InProcessServer
) -> None:
    import io

    import numpy as np
    from PIL import Image

    driver = browser
    open_page(driver, lora_server.url)
    wait_for(driver, lambda d: by_id(d, "loras-field").is_displayed(), "the LoRA list")
    assert [row.text for row in driver.find_elements("css selector", "#loras li")] == [
        "style-a\n1.00"
    ]
    by_id(driver, "prompt").send_keys("a cat")
    set_value(by_id(driver, "width"), "256")
    set_value(by_id(driver, "height"), "256")
    by_id(driver, "seed-random").find_element("xpath", "..").click()  # its switch
    set_value(by_id(driver, "seed"), "5")
    driver.execute_script(
        "const s = document.getElementById('steps'); s.value = 2;"
        "s.dispatchEvent(new Event('input', {bubbles: true}));"
    )
    driver.find_element("css selector", 'input[name="format"][value="png"]').click()
    plain = render_once(driver)

    driver.find_element("css selector", "#loras .lora-on").click()
    driver.execute_script(
        "const s = document.querySelector('#loras .lora-scale'); s.value = 1.5;"
        "s.dispatchEvent(new Event('input', {bubbles: true}));"
    )
    styled = render_once(driver)
    screenshot(driver, "playground-loras.png")

    posts = [
        json.loads(r["postData"])
        for r in requests_sent(driver, lora_server.url)
        if r["method"] == "POST" and r["url"].endswith("/v1/z-image-turbo")
    ]
    assert [body.get("loras") for body in posts] == [None, [{"path": "style-a", "scale": 1.5}]]
    pixels = [
        np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.int16) for png in (plain, styled)
    ]
    assert np.abs(pixels[0] - pixels[1]).max() > 8
    assert_no_console_errors(driver)
