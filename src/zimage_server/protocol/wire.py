"""How a protocol model goes on the wire: the keys that were set, in field order.

Optional keys that do not apply (a queued job's ``progress``) are simply not set when the
model is built, so they are absent from the JSON rather than ``null``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def wire(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_unset=True)
