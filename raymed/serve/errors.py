"""One place that turns failures into HTTP: OpenAI's error JSON with the right status.

Body: `{"error": {"message", "type", "param", "code"}}`. Bad input is a 4xx that names
the field and the value given; overload is 503/429 with `Retry-After`; only a real
server fault is a 5xx.
"""

from __future__ import annotations

from pydantic import ValidationError
from starlette.responses import JSONResponse

from raymed.serve.safety import redact


class APIError(Exception):
    """An error the API returns as it is (status, OpenAI error type, offending field)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        message = redact(message)  # an echoed value must not carry a personal identifier
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, message: str) -> APIError:
    """A field OpenAI defines (or nobody does) that raymed does not implement."""
    return bad_request(message, param=param, code="unsupported_parameter")


def from_validation_error(err: ValidationError, supported: list[str] | None = None) -> APIError:
    """The first problem of a request body, as a 400 naming the field and the value.
    `supported`: the body's fields, listed when an unknown one is refused."""
    problem = err.errors(include_url=False)[0]
    param = ".".join(str(p) for p in problem["loc"]) or None
    if problem["type"] == "missing":
        return bad_request(f"`{param}` is required", param=param, code="missing_required_parameter")
    if problem["type"] == "extra_forbidden":
        where = f"; supported: {', '.join(supported)}" if supported and len(problem["loc"]) == 1 else ""
        return unsupported(param, f"`{param}` is not a supported parameter{where}")
    message = problem["msg"].removeprefix("Value error, ")
    given = problem.get("input")
    if param and _short_scalar(given):
        message = f"`{param}`: {message}. Given: {given!r}"
    elif param:
        message = f"`{param}`: {message}"
    return bad_request(message, param=param, code="invalid_value")


def _short_scalar(value) -> bool:
    """Echo a value in the error only when it is a short scalar (never prompt text)."""
    return isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) <= 40)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def model_not_found(name: str, served: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist; this server serves `{served}`",
                    param="model", code="model_not_found")


def overloaded(status: int, retry_after_s: float | None) -> APIError:
    headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s is not None else {"Retry-After": "1"}
    kind = "rate_limit_error" if status == 429 else "overloaded_error"
    return APIError(status, "The server is overloaded: too many requests are queued. Retry later.",
                    type=kind, code="overloaded", headers=headers)


def replica_lost(request_id: str, retry_after_s: float) -> APIError:
    """The model replica died with the request on it (Serve replaces it): retrying is safe."""
    return APIError(503, f"The model replica serving request {request_id} failed; retry the request",
                    type="server_error", code="replica_failed",
                    headers={"Retry-After": str(max(1, round(retry_after_s)))})


def timed_out(seconds: float) -> APIError:
    return APIError(504, f"The request did not finish within {seconds:g} s", type="timeout_error", code="timeout")


def server_error(request_id: str) -> APIError:
    return APIError(500, f"The server failed on request {request_id}; see the server log",
                    type="server_error", code="internal_error")
