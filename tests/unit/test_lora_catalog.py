"""LoRA URLs are judged like webhooks: off by default, and no loopback when on."""

from __future__ import annotations

from pathlib import Path

import pytest

from zimage_server.core.config import Settings
from zimage_server.core.errors import InvalidRequest
from zimage_server.images.loras import LoraCatalog
from zimage_server.protocol.segmind import LoraEntry


def catalog(tmp_path: Path, **values: object) -> LoraCatalog:
    return LoraCatalog(Settings(_env_file=None, data_dir=tmp_path, **values))  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("allow", "url", "says"),
    [
        (False, "https://example.com/a.safetensors", "URLs are off on this server"),
        (True, "https://127.0.0.1/a.safetensors", "is refused"),
        (True, "https://localhost/a.safetensors", "is refused"),
        (True, "https://[::1]/a.safetensors", "is refused"),
        (True, "http://example.com/a.safetensors", "must be an https:// URL"),
    ],
)
def test_urls_are_refused_with_a_reason(tmp_path: Path, allow: bool, url: str, says: str) -> None:
    with pytest.raises(InvalidRequest, match=says) as refused:
        catalog(tmp_path, lora_allow_urls=allow).resolve_local(0, LoraEntry(path=url))
    assert refused.value.field == "loras"
