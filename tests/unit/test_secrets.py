"""Secrets and key administration: a blank secret is no secret, a key is never echoed."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from zimage_server.accounts import KeyService
from zimage_server.billing import Ledger
from zimage_server.cli import app
from zimage_server.core.config import Settings
from zimage_server.core.errors import InvalidRequest, NotFound
from zimage_server.store.db import Database


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_a_blank_admin_token_or_webhook_secret_means_unset(
    blank: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings(admin_token=blank, webhook_secret=blank).admin_token is None
    monkeypatch.setenv("ZIMAGE_ADMIN_TOKEN", blank)
    monkeypatch.setenv("ZIMAGE_WEBHOOK_SECRET", blank)
    settings = Settings()
    assert settings.admin_token is None and settings.webhook_secret is None
    monkeypatch.setenv("ZIMAGE_ADMIN_TOKEN", " s3cret ")
    token = Settings().admin_token
    assert token is not None and token.get_secret_value() == " s3cret "


@pytest.fixture
def keys(tmp_path: Path) -> KeyService:
    db = Database(f"sqlite:///{tmp_path / 'keys.db'}")
    db.upgrade()
    return KeyService(db, Ledger(db))


def test_credits_cannot_be_negative(keys: KeyService) -> None:
    with pytest.raises(InvalidRequest, match="'credits'"):
        keys.create("x", credits=-1)
    _key, info = keys.create("x", credits=5)
    for amount in (-5, 0):
        with pytest.raises(InvalidRequest, match="more than 0"):
            keys.top_up(info.prefix, amount)
    assert keys.get(info.prefix).balance == 5


def test_a_key_given_for_a_prefix_is_never_echoed(keys: KeyService) -> None:
    key, _info = keys.create("x")
    secret = key.split("_", 2)[2]
    for given in (key, key[:30], secret, secret[:12]):
        with pytest.raises(NotFound) as missing:
            keys.top_up(given, 1)
        assert secret[:6] not in missing.value.message
    with pytest.raises(NotFound, match="'0badc0de'"):
        keys.get("0badc0de")


def test_the_cli_refuses_negative_credits_without_echoing_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZIMAGE_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--name", "ci", "--credits", "-3"])
    assert created.exit_code == 1 and "must be 0 or more" in created.output
    created = runner.invoke(app, ["keys", "create", "--name", "ci", "--credits", "2"])
    assert created.exit_code == 0, created.output
    key = created.output.strip().splitlines()[-1]
    prefix = key.split("_")[1]
    topped = runner.invoke(app, ["keys", "top-up", prefix, "--", "-5"])
    assert topped.exit_code == 1 and "more than 0" in topped.output
    wrong = runner.invoke(app, ["keys", "top-up", key, "1"])
    assert wrong.exit_code == 1 and key.split("_", 2)[2][:6] not in wrong.output
    assert "prefix" in wrong.output
