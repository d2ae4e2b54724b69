"""Errors with the HTTP status an API user should see.

The shape of the body follows OpenAI's error object so every front end (native, OpenAI,
WebSocket) reports failures the same way.
"""

from __future__ import annotations


class FleetError(Exception):
    status: int = 500
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict[str, object]:
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        }


class BadRequest(FleetError):
    status = 400
    type = "invalid_request_error"


class NotFound(FleetError):
    status = 404
    type = "not_found_error"


class PayloadTooLarge(FleetError):
    status = 413
    type = "invalid_request_error"


class Unprocessable(FleetError):
    status = 422
    type = "invalid_request_error"


class Overloaded(FleetError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(FleetError):
    status = 503
    type = "service_unavailable"


class Unauthorized(FleetError):
    status = 401
    type = "authentication_error"


class Forbidden(FleetError):
    status = 403
    type = "permission_error"


class Conflict(FleetError):
    status = 409
    type = "invalid_request_error"
