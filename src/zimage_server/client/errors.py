"""Typed errors of the SDK, one per HTTP status the API documents, and one for a server
that cannot be reached at all."""

from __future__ import annotations


class APIConnectionError(Exception):
    """No reply: the server is down, the address is wrong, or the connection broke."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url
        self.reason = reason


class ZImageAPIError(Exception):
    """Any non-success reply; ``status`` and the server's ``message`` are kept."""

    def __init__(self, status: int, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.request_id = request_id


class BadRequestError(ZImageAPIError): ...


class AuthenticationError(ZImageAPIError): ...


class PermissionDeniedError(ZImageAPIError): ...


class NotFoundError(ZImageAPIError): ...


class InsufficientCreditsError(ZImageAPIError): ...


class ConflictError(ZImageAPIError): ...


class RateLimitError(ZImageAPIError): ...


class ServerError(ZImageAPIError): ...


class WorkerDiedError(ServerError): ...


class UnavailableError(ServerError): ...


class DeadlineExceededError(ServerError): ...


class JobFailedError(ZImageAPIError):
    """An async job ended FAILED (the server answers 422 with its ``error``)."""


ERRORS: dict[int, type[ZImageAPIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    406: InsufficientCreditsError,
    409: ConflictError,
    422: JobFailedError,
    429: RateLimitError,
    502: WorkerDiedError,
    503: UnavailableError,
    504: DeadlineExceededError,
}


def error_for(status: int, message: str, request_id: str | None) -> ZImageAPIError:
    cls = ERRORS.get(status, ServerError if status >= 500 else ZImageAPIError)
    return cls(status, message, request_id)
