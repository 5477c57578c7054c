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
        "outbound",
        "streams",
    ):
        for path in (PACKAGE / concern).rglob("*.py"):
            text = path.read_text()
            assert "import fastapi" not in text and "from fastapi" not in text, path
            assert "from starlette" not in text, path


def test_grafana_dashboard_uses_only_metrics_we_export() -> None:
    import json
    import re

    from zimage_server.telemetry import Metrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    exported = {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }
    dashboard = json.loads((PACKAGE.parents[1] / "deploy" / "grafana-dashboard.json").read_text())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"zimage_[a-z_]+", target["expr"])
    }
    assert used and used <= exported, used - exported


def test_the_scheduler_imports_no_process_pipe_or_worker() -> None:
    """The scheduler stays pure: it is unit-tested without a process, so it must need none."""
    import ast

    tree = ast.parse((PACKAGE / "engine" / "scheduler.py").read_text())
    imported = {
        alias.name if isinstance(node, ast.Import) else f"{node.module}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    banned = ("multiprocessing", "subprocess", "threading", "engine.handle", "engine.worker")
    assert not [name for name in imported if name.endswith(banned)], imported
