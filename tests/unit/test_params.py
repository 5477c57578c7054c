"""Request parsing: every bad input becomes an InvalidRequest that names the field."""

from __future__ import annotations

import pytest

from zimage_server.core.errors import InvalidRequest
from zimage_server.protocol.segmind import allowed_values, parse_params


def test_defaults_match_the_spec() -> None:
    p = parse_params(b'{"prompt": "a cat"}')
    assert (p.steps, p.guidance_scale, p.seed, p.width, p.height) == (8, 1.0, -1, 1024, 1024)
    assert (p.image_format, p.quality, p.base_64) == ("webp", 90, False)


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("steps", "an integer from 1 to 75"),
        ("guidance_scale", "a number from 0 to 15"),
        ("seed", "an integer from -1 to 9223372036854775807"),
        ("image_format", "one of 'jpeg', 'png', 'webp'"),
        ("base_64", "true or false"),
        ("prompt", "a non-empty string"),
    ],
)
def test_allowed_values_come_from_the_schema(field: str, text: str) -> None:
    assert allowed_values(field) == text


@pytest.mark.parametrize("alias", ["JPG", "jpg", " Jpeg "])
def test_format_aliases(alias: str) -> None:
    assert (
        parse_params(f'{{"prompt": "x", "image_format": "{alias}"}}'.encode()).image_format
        == "jpeg"
    )


def test_error_carries_the_field() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_params(b'{"prompt": "x", "quality": 0}')
    assert info.value.field == "quality"


def test_long_bad_values_are_shortened_in_the_message() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_params(b'{"prompt": "x", "image_format": "' + b"z" * 500 + b'"}')
    assert len(info.value.message) < 200


def test_bench_command_line_never_records_an_api_key() -> None:
    from zimage_server.bench.cli import redact_key

    args = ["--model", "tiny", "--api-key", "zk_abc_secret", "--api-key=zk_x_y", "--iterations"]
    expected = ["--model", "tiny", "--api-key", "***", "--api-key=***", "--iterations"]
    assert redact_key(args) == expected


def test_bench_servers_get_an_absolute_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    """``PYTHONPATH=src python benchmarks/run.py`` must not lose ``src`` in the server."""
    import os

    from zimage_server.bench.server import absolute_pythonpath

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["src", "/opt/site"]))
    expected = os.pathsep.join([os.path.join(os.getcwd(), "src"), "/opt/site"])
    assert absolute_pythonpath() == {"PYTHONPATH": expected}
    monkeypatch.delenv("PYTHONPATH")
    assert absolute_pythonpath() == {}
