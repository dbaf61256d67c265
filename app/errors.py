"""Errors whose message is meant for the person using the app (shown in the UI, returned as HTTP 4xx)."""


class UserError(Exception):
    """Bad input or a state the user can fix; the message says what was wrong and what to do."""

    status_code = 400


class NotFoundError(UserError):
    status_code = 404


class BusyError(UserError):
    status_code = 409
