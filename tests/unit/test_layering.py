"""Architecture rules that keep the API process light and the services HTTP-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "zimage_server"


def test_api_process_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "from zimage_server.api.main import create_app\n"
        "from zimage_server.cli import app\n"
        "import zimage_server.client\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr


def test_services_do_not_import_fastapi() -> None:
    for concern in (
        "accounts",
        "billing",
        "engine",
        "images",
        "jobs",
        "store",
        "telemetry",
        "client",
        "core",
    ):
        for path in (PACKAGE / concern).rglob("*.py"):
            text = path.read_text()
            assert "import fastapi" not in text and "from fastapi" not in text, path
            assert "from starlette" not in text, path
