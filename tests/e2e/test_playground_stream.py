"""The playground watching a render in the real headless Chromium: the queue position while
it waits, a progress bar of the steps, and a preview that changes from step to step (two
screenshots of the image at different steps differ), then the final image.

Steps are slowed (``ZIMAGE_DEBUG_STEP_DELAY_S``) so each one stays on screen long enough to
be photographed; one render at a time, so the page's render queues behind a job."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image, ImageChops

import tests.e2e.test_playground as pg
from tests.conftest import InProcessServer

browser = pg.browser  # the same headless Chromium fixture
STEPS = 6
ENV = {"ZIMAGE_DEBUG_STEP_DELAY_S": "0.5", "ZIMAGE_MAX_BATCH_SIZE": "1"}


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    server = InProcessServer(tmp_path_factory.mktemp("playground-stream"), env=ENV)
    yield server
    server.stop()


def shown_step(driver: pg.WebDriver) -> int:
    step = driver.execute_script(
        "const img = document.getElementById('result');"
        "return img.src.startsWith('data:image/webp') && img.complete ? img.dataset.step : null"
    )
    return int(step) if step else 0


def image_at_step(driver: pg.WebDriver, step: int) -> tuple[int, Image.Image]:
    """A screenshot of the stage's image once it shows ``step`` (or a later one)."""
    pg.wait_for(driver, lambda d: shown_step(d) >= step, f"the preview of step {step}")
    png = pg.by_id(driver, "result").screenshot_as_png
    return shown_step(driver), Image.open(io.BytesIO(png)).convert("RGB")


def test_the_image_sharpens_step_by_step_with_queue_and_progress(
    browser: pg.WebDriver, slow_server: InProcessServer
) -> None:
    driver = browser
    pg.open_page(driver, slow_server.url)
    pg.by_id(driver, "prompt").send_keys("a lighthouse, watched as it renders")
    driver.find_element("css selector", '.preset[data-w="512"][data-h="512"]').click()
    driver.execute_script(
        "const s = document.getElementById('steps');"
        f"s.value = '{STEPS}'; s.dispatchEvent(new Event('input'));"
        "window.__steps = [];"
        "const img = document.getElementById('result');"
        "new MutationObserver(() => window.__steps.push(img.dataset.step))"
        "  .observe(img, {attributes: true, attributeFilter: ['data-step']});"
    )
    blocker = {"prompt": "ahead in the queue", "width": 256, "height": 256, "steps": 4}
    assert httpx.post(f"{slow_server.url}/v2/z-image-turbo", json=blocker).status_code == 202
    pg.by_id(driver, "generate").click()

    text = pg.by_id(driver, "progress-text")
    pg.wait_for(driver, lambda d: text.text == "Queued · position 1", "the queue position")
    pg.screenshot(driver, "playground-queued.png")

    early_step, early = image_at_step(driver, 2)
    assert text.text.startswith("Step ") and text.text.endswith(f" / {STEPS}")
    width = driver.execute_script(
        "return document.getElementById('progress-fill').getBoundingClientRect().width"
    )
    assert width > 0, "the progress bar did not move"
    pg.screenshot(driver, "playground-step-early.png")
    late_step, late = image_at_step(driver, STEPS - 1)
    pg.screenshot(driver, "playground-step-late.png")
    assert late_step > early_step
    difference = ImageChops.difference(early, late).getbbox()
    assert difference is not None, "the preview did not change between steps"
    assert len(set(early.getdata())) > 16, "the preview is blank"

    pg.wait_for_image(driver, 512, 512)  # then the final image replaces the previews
    seen = [int(step) for step in driver.execute_script("return window.__steps") if step]
    assert seen == sorted(seen) and len(set(seen)) >= STEPS - 2, seen
    assert not pg.by_id(driver, "progress").is_displayed()
    assert pg.by_id(driver, "result-seed").text.isdigit()
    pg.assert_no_console_errors(driver)
