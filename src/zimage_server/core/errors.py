"""The one error hierarchy of zimage-server.

Services raise these; ``zimage_server.api.errors`` maps them to HTTP in a single table.
Exceptions carry data (field, retry_after, ...) rather than only strings.

    ZImageError                   500  anything we did not foresee (message not shown)
    ├── InvalidRequest            400  a parameter or body is wrong; names the field
    ├── Unauthenticated           401  missing or unknown API key (or admin token)
    ├── Forbidden                 403  key disabled, or without the route's scope
    ├── InsufficientCredits       406  the balance does not cover the price
    ├── NotFound                  404
    │   ├── UnknownModel               model slug that this server does not serve
    │   └── OutputNotFound             unknown, expired or malformed output id
    ├── Overloaded                429  queue full; carries retry_after
    │   └── RateLimited                the key's per-minute or in-flight limit
    ├── NotReady                  503  model still loading or worker restarting
    │   └── StoreUnavailable           the database cannot be reached
    ├── InsufficientStorage       507  the output disk is full
    ├── WorkerDied                502  the worker process died during the render
    ├── DeadlineExceeded          504  the request's deadline passed
    ├── GenerationFailed          500  the model raised; message is safe to show
    ├── Cancelled                 409  the job was cancelled (reported in job status)
    ├── Conflict                  409  e.g. an Idempotency-Key reused with another body
    └── StartupError              ---  the server cannot start as configured (CLI exits 2)
"""

from __future__ import annotations


class ZImageError(Exception):
    """Base of every error that zimage-server raises on purpose."""

    public = False  # whether ``str(self)`` may be shown to a client

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ZImageError):
    public = True

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Unauthenticated(ZImageError):
    public = True


class Forbidden(ZImageError):
    public = True


class InsufficientCredits(ZImageError):
    public = True

    def __init__(self, message: str, balance: int, price: int) -> None:
        super().__init__(message)
        self.balance = balance
        self.price = price


class NotFound(ZImageError):
    public = True


class UnknownModel(NotFound):
    pass


class OutputNotFound(NotFound):
    pass


class Overloaded(ZImageError):
    public = True

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(Overloaded):
    def __init__(self, message: str, retry_after: int, headers: dict[str, str]) -> None:
        super().__init__(message, retry_after)
        self.headers = headers


class NotReady(ZImageError):
    public = True

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreUnavailable(NotReady):
    pass


class InsufficientStorage(ZImageError):
    public = True


class WorkerDied(ZImageError):
    public = True


class DeadlineExceeded(ZImageError):
    public = True


class GenerationFailed(ZImageError):
    public = True


class Cancelled(ZImageError):
    public = True


class Conflict(ZImageError):
    public = True


class StartupError(ZImageError):
    """Bad configuration found before serving: missing weights, no GPU, ..."""

    public = True
