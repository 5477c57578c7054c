"""``scripts/gpu-wheels`` must carry every runtime dependency the GPU image lacks.

A lent GPU machine has no internet: a dependency missing from the wheels stops every server
there, and that costs device time to find (seven were missing before the first H200 run). Each
of pyproject's dependencies is either downloaded, already on the image, or never imported
by the benchmark; adding one to pyproject without deciding which fails here.
"""

from __future__ import annotations

import re
import tomllib

from tests.conftest import ROOT


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _array(script: str, name: str) -> set[str]:
    match = re.search(rf"^{name}=\(([^)]*)\)", script, re.MULTILINE)
    assert match, f"{name}=(...) not found in scripts/gpu-wheels"
    body = "\n".join(line.split("#")[0] for line in match.group(1).splitlines())
    return {_normal(word) for word in body.split()}


def test_every_dependency_is_carried_on_the_image_or_not_needed() -> None:
    script = (ROOT / "scripts" / "gpu-wheels").read_text()
    carried = _array(script, "PACKAGES")
    image = _array(script, "ON_THE_IMAGE")
    unneeded = _array(script, "NOT_NEEDED")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_normal(re.split(r"[\[<>=!~; ]", dep)[0]) for dep in project["dependencies"]}
    unplaced = wanted - carried - image - unneeded
    assert not unplaced, f"add to PACKAGES, ON_THE_IMAGE or NOT_NEEDED: {sorted(unplaced)}"
    assert not (carried & image), "carried and already on the image"
    # uvicorn[standard]'s HTTP parser: the server imports it (api/serving.py).
    assert "httptools" in carried
