"""One configuration source: every setting is declared once and has an effect."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zimage_server.core.config import (
    EngineSettings,
    Settings,
    SpeedupSettings,
    WorkerSettings,
    section,
)

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "zimage_server"


def _sources() -> str:
    """The package's code; declarations (``name: type = ...``) do not match ``.name``."""
    return "\n".join(path.read_text() for path in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_is_read_somewhere(name: str) -> None:
    """A ``ZIMAGE_*`` variable that nothing reads would be a switch that does nothing."""
    assert re.search(rf"\.{name}\b", _sources()), f"ZIMAGE_{name.upper()} is never read"


def test_each_part_is_declared_once_and_handed_down_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZIMAGE_MAX_QUEUE", "7")
    monkeypatch.setenv("ZIMAGE_WARMUP_SIZES", "512,768")
    monkeypatch.setenv("ZIMAGE_COMPILE", "off")
    settings = Settings()
    parts = (EngineSettings, WorkerSettings, SpeedupSettings)
    names = [set(part.model_fields) for part in parts]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert type(settings.engine) is EngineSettings and settings.engine.max_queue == 7
    assert settings.worker.warmup_sizes == [512, 768]
    assert settings.speedups == SpeedupSettings(compile="off")
    assert section(settings, WorkerSettings) == settings.worker
    for part in parts:  # defaults live in the part, and nowhere else
        for name, field in part.model_fields.items():
            assert Settings.model_fields[name].default == field.default, name


def test_the_readme_documents_every_setting() -> None:
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"ZIMAGE_{name.upper()}" not in readme]
    assert not missing, missing
