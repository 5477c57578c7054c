"""``/docs`` and ``/redoc`` in a real headless Chromium: they render the API from assets the
server itself serves (Swagger UI 5, which OpenAPI 3.1 needs, and ReDoc), and the page asks
nothing of any other host, so the docs work on an air-gapped install."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import requests

from tests.conftest import InProcessServer
from tests.e2e.test_playground import browser, wait_for

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

__all__ = ["browser"]  # the fixture, shared with the playground tests


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    server = InProcessServer(tmp_path_factory.mktemp("docs"), env={"ZIMAGE_MODEL": "null"})
    yield server
    server.stop()


def requested_urls(driver: WebDriver) -> list[str]:
    """Every URL the page asked for, from Chromium's own network log."""
    urls = []
    for entry in driver.get_log("performance"):  # type: ignore[no-untyped-call]
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return [url for url in urls if url.startswith(("http:", "https:", "ws:", "wss:"))]


def test_swagger_ui_renders_every_operation_from_local_assets(
    browser: WebDriver, docs_server: InProcessServer
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(docs_server.url + "/docs")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"), "the operations")
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/v1/{model}", "/readyz", "/v2/{model}"} <= paths, paths
    assert not browser.find_elements(By.CSS_SELECTOR, ".errors-wrapper")
    version = browser.execute_script("return window.versions && window.versions.swaggerUI")
    assert version is None or str(version.get("version", "5")).startswith("5"), version
    urls = requested_urls(browser)
    assert urls and all(u.startswith(docs_server.url) for u in urls), urls


def test_redoc_renders_from_local_assets(browser: WebDriver, docs_server: InProcessServer) -> None:
    from selenium.webdriver.common.by import By

    browser.get(docs_server.url + "/redoc")
    wait_for(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, "[data-section-id]"), "the sections"
    )
    # All but ReDoc's "API docs by Redocly" logo, an image its bundle links to: offline, the
    # footer only lacks that picture.
    urls = [u for u in requested_urls(browser) if u != "https://cdn.redoc.ly/redoc/logo-mini.svg"]
    assert urls and all(u.startswith(docs_server.url) for u in urls), urls


def test_the_docs_pages_name_no_other_host(docs_server: InProcessServer) -> None:
    for page in ("/docs", "/redoc"):
        html = requests.get(docs_server.url + page, timeout=10).text
        assert "https://" not in html and "http://" not in html, html
