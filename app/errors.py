"""Errors whose message is meant for the person using the app (shown in the UI, returned as HTTP 4xx)."""


class UserError(Exception):
    """Bad input or a state the user can fix; the message says what was wrong and what to do. `field` names the API
    field at fault where there is one (the message uses the UI's label), so API clients can point at it."""

    status_code = 400

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class NotFoundError(UserError):
    status_code = 404


class BusyError(UserError):
    status_code = 409


class QueueFullError(UserError):
    """Too many jobs are waiting; the client should retry later (HTTP 503 with Retry-After)."""

    status_code = 503

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after
