"""The one error hierarchy of zimage-server.

Services raise these; ``zimage_server.api.errors.render_error`` turns any of them into an
HTTP response, in Segmind's or OpenAI's envelope. The HTTP status of each class is its
``status`` attribute (the tree below is that table); the data a response needs (message,
field, retry_after, headers) lives on the base class, set by one keyword-only constructor,
so every error pickles with its data intact (a Ray replica sends them across processes).

    ZImageError                   500  anything we did not foresee (message not shown)
    ├── InvalidRequest            400  a parameter or body is wrong; names the field
    ├── Unauthenticated           401  missing or unknown API key (or admin token)
    ├── Forbidden                 403  key disabled, or without the route's scope
    ├── NotFound                  404
    │   ├── UnknownModel               model slug that this server does not serve
    │   │   └── TaskNotConfigured          a task slug whose weights are not configured
    │   └── OutputNotFound             unknown, expired or malformed output id
    ├── MethodNotAllowed          405  the path exists, not with this method
    ├── InsufficientCredits       406  the balance does not cover the price
    ├── RequestTimeout            408  the client sent its body too slowly
    ├── Cancelled                 409  the job was cancelled (reported in job status)
    ├── Conflict                  409  e.g. an Idempotency-Key reused with another body
    ├── PayloadTooLarge           413  the body is over the server's limit
    ├── UnsupportedMediaType      415  a JSON body sent without a JSON Content-Type
    ├── ClientDisconnected        499  the client left before the answer (nobody reads it)
    ├── Overloaded                429  queue full; carries retry_after
    │   └── RateLimited                the key's per-minute or in-flight limit
    ├── GenerationFailed          500  the model raised; message is safe to show
    ├── WorkerDied                502  the worker process died during the render
    ├── NotReady                  503  model loading, worker restarting, or shutting down
    │   ├── StoreUnavailable           the database cannot be reached
    │   ├── LimitsUnavailable          Redis, where limits are counted, cannot be reached
    │   └── OutputStoreUnavailable     the output bucket cannot be reached
    ├── DeadlineExceeded          504  the request's deadline passed
    ├── InsufficientStorage       507  the output disk is full
    └── StartupError              500  the server cannot start as configured (CLI exits 2)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class ZImageError(Exception):
    """Base of every error that zimage-server raises on purpose.

    ``ZImageError(message, *, field=None, retry_after=None, headers=None)`` is the only
    constructor shape; subclasses change class attributes, never the signature.
    """

    status: ClassVar[int] = 500
    public: ClassVar[bool] = False  # whether ``message`` may be shown to a client
    default_retry_after: ClassVar[int | None] = None

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        retry_after: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field  # the parameter at fault (OpenAI's ``param``)
        self.retry_after = self.default_retry_after if retry_after is None else retry_after
        self.headers: dict[str, str] = dict(headers or {})

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt through the one constructor, with every piece of data.
        return (_rebuild, (type(self), self.message, self.field, self.retry_after, self.headers))

    def __repr__(self) -> str:
        data = {"field": self.field, "retry_after": self.retry_after, "headers": self.headers}
        extra = "".join(f", {k}={v!r}" for k, v in data.items() if v)
        return f"{type(self).__name__}({self.message!r}{extra})"


def _rebuild(
    cls: type[ZImageError],
    message: str,
    field: str | None,
    retry_after: int | None,
    headers: dict[str, str],
) -> ZImageError:
    return cls(message, field=field, retry_after=retry_after, headers=headers)


class InvalidRequest(ZImageError):
    status = 400
    public = True


class Unauthenticated(ZImageError):
    status = 401
    public = True


class Forbidden(ZImageError):
    status = 403
    public = True


class NotFound(ZImageError):
    status = 404
    public = True


class UnknownModel(NotFound):
    pass


class TaskNotConfigured(UnknownModel):
    """A slug this server knows but cannot serve as configured (ControlNet without
    ``ZIMAGE_CONTROLNET``): the message says which setting turns it on."""


class OutputNotFound(NotFound):
    pass


class MethodNotAllowed(ZImageError):
    """Carries the ``Allow`` header."""

    status = 405
    public = True


class InsufficientCredits(ZImageError):
    status = 406
    public = True


class RequestTimeout(ZImageError):
    status = 408
    public = True


class Cancelled(ZImageError):
    """The one cancellation error: the engine raises it for a cancelled render."""

    status = 409
    public = True


class Conflict(ZImageError):
    status = 409
    public = True


class PayloadTooLarge(ZImageError):
    status = 413
    public = True


class UnsupportedMediaType(ZImageError):
    status = 415
    public = True


class ClientDisconnected(ZImageError):
    """The client closed the connection mid-request: the render was stopped and its hold
    released. The status is nginx's 499, for the access log: no client sees it."""

    status = 499
    public = True


class Overloaded(ZImageError):
    status = 429
    public = True
    default_retry_after = 1


class RateLimited(Overloaded):
    """Carries the key's rate-limit headers."""


class GenerationFailed(ZImageError):
    status = 500
    public = True


class WorkerDied(ZImageError):
    status = 502
    public = True


class NotReady(ZImageError):
    status = 503
    public = True
    default_retry_after = 5


class StoreUnavailable(NotReady):
    pass


class LimitsUnavailable(NotReady):
    """Redis, where the limits are counted, cannot be reached (503, nothing charged)."""


class OutputStoreUnavailable(NotReady):
    """The output bucket cannot be reached or refuses us (503, nothing charged)."""


class DeadlineExceeded(ZImageError):
    status = 504
    public = True


class InsufficientStorage(ZImageError):
    status = 507
    public = True


class StartupError(ZImageError):
    """Bad configuration found before serving: missing weights, no GPU, ..."""

    public = True
