"""The playground's image tasks in the real headless Chromium, against the real tiny server.

An input image loaded from the file picker, a paste and a drop; image to image with the result
beside the input (stacked on a phone); a mask painted with the brush and partly erased, read
back from the page's mask canvas and from the request it sent, then an inpaint; an uploaded
mask; and ControlNet on a server without it, which shows the server's explanation.

What the page sent is read through a wrapper around ``fetch`` (Chromium's DevTools log drops
large request bodies); the server answering 200 on a task's slug is itself the proof that an
image (and a mask) came with it, since those slugs refuse a request without them.
"""

from __future__ import annotations

import base64
import io
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

import tests.e2e.test_playground as pg
from tests.conftest import InProcessServer

browser = pg.browser  # the same headless Chromium fixture
INPUT = (320, 272)  # not multiples of 16: the result still has exactly this size


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    """A small image with structure (a gradient and two shapes) that compresses well."""
    width, height = size
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 8, height // 8, width // 2, height // 2), fill=(200, 40 + seed, 60))
    draw.ellipse((width // 2, height // 2, width - 8, height - 8), fill=(30, 90, 220 - seed))
    return image


def write_png(path: Path, image: Image.Image) -> Path:
    image.save(path, format="PNG")
    return path


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def decode_data_uri(value: str) -> Image.Image:
    header, _, payload = value.partition(",")
    assert header == "data:image/png;base64", header
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def start(driver: pg.WebDriver, server: InProcessServer, task: str) -> None:
    """The page with a prompt, two steps, PNG output, the task picked, and a record of the
    POSTs it sends (``window.__posts``)."""
    pg.open_page(driver, server.url)
    pg.by_id(driver, "prompt").send_keys("a red box and a blue ball")
    driver.execute_script(
        "const s = document.getElementById('steps'); s.value = 2;"
        "s.dispatchEvent(new Event('input', {bubbles: true}));"
        "window.__posts = [];"
        "const sent = window.fetch;"
        "window.fetch = (url, init) => {"
        "  if (init && init.method === 'POST')"
        "    window.__posts.push({url: String(url), body: JSON.parse(init.body)});"
        "  return sent(url, init);"
        "};"
        "window.__steps = [];"
        "const img = document.getElementById('result');"
        "new MutationObserver(() => window.__steps.push(img.dataset.step))"
        "  .observe(img, {attributes: true, attributeFilter: ['data-step']});"
    )
    driver.find_element("css selector", 'input[name="format"][value="png"]').click()
    pick_task(driver, task)


def pick_task(driver: pg.WebDriver, task: str) -> None:
    driver.find_element("css selector", f'input[name="task"][value="{task}"]').click()
    assert pg.by_id(driver, "workspace").get_attribute("data-task") == task


def posts(driver: pg.WebDriver) -> list[dict[str, Any]]:
    return list(driver.execute_script("return window.__posts"))


def load_file(driver: pg.WebDriver, path: Path, size: tuple[int, int]) -> None:
    pg.by_id(driver, "image-file").send_keys(str(path))
    wait_loaded(driver, size)


def wait_loaded(driver: pg.WebDriver, size: tuple[int, int]) -> None:
    shown = f"{size[0]} × {size[1]}"
    pg.wait_for(driver, lambda d: pg.by_id(d, "input-size").text == shown, f"a {shown} input")


def canvas_pixel(driver: pg.WebDriver, canvas: str, x: int, y: int) -> tuple[int, ...]:
    pixel = driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "return Array.from(c.getContext('2d').getImageData(arguments[1], arguments[2], 1, 1).data)",
        canvas,
        x,
        y,
    )
    return tuple(int(v) for v in pixel)


def mask_pixels(driver: pg.WebDriver) -> Image.Image:
    """The page's #mask canvas (what it sends), read back as an RGBA image."""
    data = driver.execute_script(
        "const c = document.getElementById('mask');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let red = '';"
        "for (let i = 0; i < d.length; i += 4) red += String.fromCharCode(d[i]);"
        "return [c.width, c.height, btoa(red)]"
    )
    return Image.frombytes("L", (int(data[0]), int(data[1])), base64.b64decode(data[2]))


def set_range(driver: pg.WebDriver, element_id: str, value: float) -> None:
    driver.execute_script(
        "const s = document.getElementById(arguments[0]); s.value = arguments[1];"
        "s.dispatchEvent(new Event('input', {bubbles: true}));",
        element_id,
        str(value),
    )


def rect(driver: pg.WebDriver, element_id: str) -> dict[str, float]:
    return dict(
        driver.execute_script(
            "return document.getElementById(arguments[0]).getBoundingClientRect().toJSON()",
            element_id,
        )
    )


def stroke(driver: pg.WebDriver, points: list[tuple[int, int]]) -> None:
    """Press, drag through ``points`` (CSS pixels from the overlay's centre), release."""
    from selenium.webdriver.common.action_chains import ActionChains

    overlay = pg.by_id(driver, "mask-overlay")
    actions = ActionChains(driver, duration=20)
    actions.move_to_element_with_offset(overlay, *points[0]).click_and_hold()
    for (x0, y0), (x1, y1) in pairwise(points):
        actions.move_by_offset(x1 - x0, y1 - y0)
    actions.release().perform()


def test_img2img_from_the_file_picker_shows_the_result_beside_the_input(
    browser: pg.WebDriver, server: InProcessServer, tmp_path: Path
) -> None:
    driver = browser
    start(driver, server, "img2img")
    assert pg.by_id(driver, "input-pane").is_displayed()
    assert pg.by_id(driver, "strength-field").is_displayed()
    assert not pg.by_id(driver, "mask-tools").is_displayed()

    # Generating without an image is refused in the page, before any request.
    pg.by_id(driver, "generate").click()
    assert pg.by_id(driver, "error-title").text == "No input image"
    assert posts(driver) == []

    image = picture(INPUT, seed=0)
    path = write_png(tmp_path / "input.png", image)
    load_file(driver, path, INPUT)
    assert not pg.by_id(driver, "error").is_displayed()
    assert pg.by_id(driver, "width").get_attribute("value") == "320"  # the input's size
    assert pg.by_id(driver, "height").get_attribute("value") == "272"
    for x, y in [(5, 5), (100, 60), (250, 220)]:
        assert canvas_pixel(driver, "input-canvas", x, y)[:3] == image.getpixel((x, y))

    set_range(driver, "strength", 0.5)
    assert pg.by_id(driver, "strength-value").text == "0.50"
    pg.by_id(driver, "generate").click()
    pg.wait_for_image(driver, *INPUT)
    # Streamed like text to image: a preview of the one step that strength 0.5 of 2 runs.
    assert driver.execute_script("return window.__steps") == ["1"]
    (sent,) = posts(driver)
    assert sent["url"] == "v1/z-image-turbo-img2img"
    # The file's own bytes, not a re-encoding of them.
    assert (
        sent["body"]["image"]
        == "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    )
    assert (sent["body"]["strength"], sent["body"]["width"], sent["body"]["height"]) == (
        0.5,
        320,
        272,
    )
    assert "mask_image" not in sent["body"]
    assert "Image to image" in pg.history(driver)[0].text

    # Side by side on a desktop: the input on the left, the result on the right, level.
    left, right = rect(driver, "input-pane"), rect(driver, "stage")
    assert left["right"] <= right["left"] and abs(left["top"] - right["top"]) < 2
    pg.screenshot(driver, "playground-img2img.png")
    # Stacked on a phone, with nothing overflowing sideways.
    pg.viewport(driver, 390, 844, mobile=True)
    top, bottom = rect(driver, "input-pane"), rect(driver, "stage")
    assert top["bottom"] <= bottom["top"]
    assert driver.execute_script(
        "return document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )
    driver.execute_script("document.getElementById('input-pane').scrollIntoView()")
    pg.screenshot(driver, "playground-img2img-mobile.png")
    pg.assert_no_console_errors(driver)


def test_inpaint_mask_painted_with_brush_and_eraser(
    browser: pg.WebDriver, server: InProcessServer, tmp_path: Path
) -> None:
    driver = browser
    start(driver, server, "inpaint")
    load_file(driver, write_png(tmp_path / "input.png", picture(INPUT, seed=9)), INPUT)
    assert pg.by_id(driver, "mask-tools").is_displayed()
    overlay = rect(driver, "mask-overlay")
    scale = INPUT[0] / overlay["width"]  # image pixels per CSS pixel
    assert abs(INPUT[1] / overlay["height"] - scale) < 0.01  # the image keeps its shape
    assert mask_pixels(driver).getextrema() == (0, 0)  # all black: nothing to repaint

    # An empty mask is refused in the page: it would change nothing.
    pg.by_id(driver, "generate").click()
    assert pg.by_id(driver, "error-title").text == "Nothing to repaint"
    assert posts(driver) == []

    # A horizontal brush stroke through the middle, 20 CSS pixels wide.
    set_range(driver, "brush-size", 20)
    third = int(overlay["width"] / 3)
    stroke(driver, [(-third, 0), (-third // 2, 0), (0, 0), (third // 2, 0), (third, 0)])
    assert not pg.by_id(driver, "error").is_displayed()  # painting answered it
    mask = mask_pixels(driver)
    assert mask.size == INPUT
    cx, cy = INPUT[0] // 2, INPUT[1] // 2
    on_line = [(cx + round(dx * scale), cy) for dx in (-third + 4, -third // 2, 0, third - 4)]
    assert [mask.getpixel(p) for p in on_line] == [255] * 4, "the stroke is not white"
    off_line = [(5, 5), (cx, cy - round(30 * scale)), (cx, cy + round(30 * scale)), (315, 268)]
    assert [mask.getpixel(p) for p in off_line] == [0] * 4, "unpainted pixels are not black"
    assert canvas_pixel(driver, "mask-overlay", cx, cy)[3] == 255  # shown tinted
    painted = sum(1 for v in mask.getdata() if v == 255)
    expected = (2 * third * scale) * (20 * scale)  # the stroke's length x its width
    assert 0.8 * expected < painted < 1.3 * expected + 400 * scale * scale, (painted, expected)

    # The eraser over the stroke's right half: black again there, the left half kept.
    driver.find_element("css selector", 'input[name="mask-tool"][value="eraser"]').click()
    set_range(driver, "brush-size", 40)
    stroke(driver, [(10, 0), (third // 2, 0), (third + 25, 0)])
    mask = mask_pixels(driver)
    erased = [(cx + round(dx * scale), cy) for dx in (third // 2, third - 4)]
    assert [mask.getpixel(p) for p in erased] == [0, 0], "the eraser left the stroke"
    kept = [(cx + round(dx * scale), cy) for dx in (-third + 4, -third // 2)]
    assert [mask.getpixel(p) for p in kept] == [255, 255], "the eraser took too much"
    assert canvas_pixel(driver, "mask-overlay", *erased[0])[3] == 0
    pg.screenshot(driver, "playground-inpaint-mask.png")

    pg.by_id(driver, "generate").click()
    pg.wait_for_image(driver, *INPUT)
    (sent,) = posts(driver)
    assert sent["url"] == "v1/z-image-turbo-inpaint"
    assert sent["body"]["strength"] == 1  # inpainting's default
    sent_mask = decode_data_uri(sent["body"]["mask_image"]).convert("L")
    assert sent_mask.size == INPUT
    assert [sent_mask.getpixel(p) for p in kept + erased + off_line] == [255] * 2 + [0] * 6
    pg.screenshot(driver, "playground-inpaint.png")

    # Clear, then a mask uploaded instead, half the image's size: stretched to fit.
    pg.by_id(driver, "mask-clear").click()
    assert mask_pixels(driver).getextrema() == (0, 0)
    upload = Image.new("L", (INPUT[0] // 2, INPUT[1] // 2), 0)
    ImageDraw.Draw(upload).rectangle((0, 0, INPUT[0] // 4 - 1, INPUT[1] // 4 - 1), fill=255)
    pg.by_id(driver, "mask-file").send_keys(str(write_png(tmp_path / "mask.png", upload)))
    pg.wait_for(driver, lambda d: "stretched" in pg.by_id(d, "mask-note").text, "the mask")
    mask = mask_pixels(driver)
    corners = [(10, 10), (150, 125), (170, 145), (300, 260)]  # the stretched square's inside
    assert [mask.getpixel(p) for p in corners] == [255, 255, 0, 0]

    # A finger paints too (touch pointer events), and the page does not scroll instead.
    pg.by_id(driver, "mask-clear").click()
    driver.find_element("css selector", 'input[name="mask-tool"][value="brush"]').click()
    touch_stroke(driver, [(-30, 40), (0, 40), (30, 40)])
    mask = mask_pixels(driver)
    below = round(40 * scale)
    assert [mask.getpixel((cx + round(dx * scale), cy + below)) for dx in (-25, 0, 25)] == [255] * 3
    assert mask.getpixel((cx, cy)) == 0
    pg.assert_no_console_errors(driver)


def touch_stroke(driver: pg.WebDriver, points: list[tuple[int, int]]) -> None:
    """A one-finger drag through ``points`` (CSS pixels from the overlay's centre)."""
    box = rect(driver, "mask-overlay")
    centre = (box["left"] + box["width"] / 2, box["top"] + box["height"] / 2)
    kinds = ["touchStart"] + ["touchMove"] * (len(points) - 1)
    for kind, (dx, dy) in zip(kinds, points, strict=True):
        finger = {"x": centre[0] + dx, "y": centre[1] + dy, "id": 1}
        driver.execute_cdp_cmd(  # type: ignore[attr-defined]
            "Input.dispatchTouchEvent", {"type": kind, "touchPoints": [finger]}
        )
    driver.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})  # type: ignore[attr-defined]


PASTE = (
    "const [uri, kind] = arguments;"
    "const bytes = Uint8Array.from(atob(uri.split(',')[1]), (c) => c.charCodeAt(0));"
    "const data = new DataTransfer();"
    "data.items.add(new File([bytes], 'pasted.png', {type: 'image/png'}));"
    "if (kind === 'paste')"
    "  document.getElementById('prompt').dispatchEvent("
    "    new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));"
    "else document.getElementById('dropzone').dispatchEvent("
    "    new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));"
)


def test_paste_and_drop_load_the_image(browser: pg.WebDriver, server: InProcessServer) -> None:
    driver = browser
    start(driver, server, "text-to-image")
    assert not pg.by_id(driver, "input-pane").is_displayed()

    # A pasted image (into the prompt, even) becomes the input and picks image to image.
    pasted = picture((300, 200), seed=3)
    driver.execute_script(PASTE, data_uri(pasted), "paste")
    wait_loaded(driver, (300, 200))
    assert pg.by_id(driver, "workspace").get_attribute("data-task") == "img2img"
    assert pg.by_id(driver, "prompt").get_attribute("value") == "a red box and a blue ball"
    assert canvas_pixel(driver, "input-canvas", 60, 40)[:3] == pasted.getpixel((60, 40))
    # Below the smallest side the server takes, the size fields keep the input's shape.
    assert pg.by_id(driver, "width").get_attribute("value") == "384"
    assert pg.by_id(driver, "height").get_attribute("value") == "256"

    # A dropped image replaces it.
    dropped = picture((600, 400), seed=30)
    driver.execute_script(PASTE, data_uri(dropped), "drop")
    wait_loaded(driver, (600, 400))
    assert canvas_pixel(driver, "input-canvas", 500, 350)[:3] == dropped.getpixel((500, 350))
    assert pg.by_id(driver, "width").get_attribute("value") == "600"
    assert pg.by_id(driver, "height").get_attribute("value") == "400"

    # A dropped file that is no image is refused clearly; the loaded image stays.
    driver.execute_script(
        "const data = new DataTransfer();"
        "data.items.add(new File(['hello'], 'notes.txt', {type: 'text/plain'}));"
        "document.getElementById('dropzone').dispatchEvent("
        "  new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));"
    )
    assert pg.by_id(driver, "error-title").text == "Not an image"
    assert pg.by_id(driver, "input-size").text == "600 × 400"
    assert posts(driver) == []
    pg.assert_no_console_errors(driver)


def test_controlnet_on_a_server_without_it_shows_the_servers_reason(
    browser: pg.WebDriver, server: InProcessServer, tmp_path: Path
) -> None:
    driver = browser
    start(driver, server, "controlnet")
    assert pg.by_id(driver, "controlnet-field").is_displayed()
    assert not pg.by_id(driver, "strength-field").is_displayed()
    image = picture(INPUT, seed=5)
    load_file(driver, write_png(tmp_path / "control.png", image), INPUT)
    set_range(driver, "cn-scale", 1.2)
    assert pg.by_id(driver, "cn-scale-value").text == "1.20"
    from selenium.webdriver.support.ui import Select

    Select(pg.by_id(driver, "control-type")).select_by_value("canny")

    pg.by_id(driver, "generate").click()
    pg.wait_for(driver, lambda d: pg.by_id(d, "error").is_displayed(), "the error")
    body = posts(driver)[0]["body"]
    assert posts(driver)[0]["url"] == "v1/z-image-turbo-controlnet"
    assert (body["controlnet_conditioning_scale"], body["control_type"]) == (1.2, "canny")
    assert "image" not in body and "mask_image" not in body and "strength" not in body
    direct = httpx.post(f"{server.url}/v1/z-image-turbo-controlnet", json=body, timeout=30)
    assert direct.status_code == 404, direct.text
    assert pg.by_id(driver, "error-title").text == "Not available on this server (404)"
    assert pg.by_id(driver, "error-text").text == direct.json()["error"]
    assert not pg.by_id(driver, "generate").get_attribute("disabled")
    assert not pg.by_id(driver, "result").is_displayed()
    pg.screenshot(driver, "playground-controlnet-404.png")

    # ControlNet inpainting: the mask tools appear, and the image and its mask go along.
    pg.by_id(driver, "cn-inpaint").click()
    assert pg.by_id(driver, "mask-tools").is_displayed()
    stroke(driver, [(-20, 0), (20, 0)])
    pg.by_id(driver, "generate").click()
    pg.wait_for(driver, lambda d: len(posts(d)) == 2, "the second request")
    body = posts(driver)[1]["body"]
    assert body["image"] == body["control_image"]
    assert decode_data_uri(body["mask_image"]).size == INPUT
    pg.wait_for(driver, lambda d: pg.by_id(d, "error").is_displayed(), "the error again")

    # The page carries on: the same image, image to image, renders.
    pick_task(driver, "img2img")
    pg.by_id(driver, "generate").click()
    pg.wait_for_image(driver, *INPUT)
    assert not pg.by_id(driver, "error").is_displayed()
    pg.assert_no_console_errors(driver, allowed=("404",))
