"""Request-level access: which key is calling (``x-api-key`` or ``Authorization: Bearer``)."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator

from fastapi import Request

from zimage_server.accounts import AccessControl, Admission
from zimage_server.core.errors import InvalidRequest, NotFound, Unauthenticated

MAX_DEADLINE_S = 86_400


def api_key_from(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def admit_generate(request: Request) -> AsyncIterator[Admission]:
    """Dependency for billable routes: authenticate, rate-limit, free the slot afterwards."""
    access: AccessControl = request.app.state.access
    admission = await access.admit(api_key_from(request), "generate")
    if admission.principal is not None:
        request.state.log_key = admission.principal.prefix  # never the key itself
    try:
        yield admission
    finally:
        access.leave(admission)


async def identify_caller(request: Request) -> Admission:
    """Dependency for read-only routes: authenticate without counting a request."""
    access: AccessControl = request.app.state.access
    return await access.identify(api_key_from(request), "generate")


def deadline_from(request: Request) -> float | None:
    """``X-Deadline-Seconds``: how long the client will wait (v1) or the job may take (v2)."""
    raw = request.headers.get("x-deadline-seconds")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_DEADLINE_S:
        raise InvalidRequest(
            f"Invalid 'X-Deadline-Seconds' header: must be a number of seconds above 0 and "
            f"at most {MAX_DEADLINE_S} (got {raw[:40]!r}).",
            field="X-Deadline-Seconds",
        )
    return value


def require_admin(request: Request) -> None:
    """The admin API exists only when an admin token is configured."""
    token = request.app.state.settings.admin_token
    if token is None:
        raise NotFound(f"No such endpoint: {request.method} {request.url.path}.")
    given = request.headers.get("x-admin-token") or api_key_from(request) or ""
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise Unauthenticated("Missing or invalid admin token.")
