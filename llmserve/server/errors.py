"""The OpenAI error object, `{"error": {"message", "type", "param", "code"}}`, and the one exception
every layer of the server raises to produce it. OpenAI SDKs parse error bodies as JSON, so no
response of ours, 404 for an unknown route included, may be plain text."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

INVALID_REQUEST = "invalid_request_error"

_TYPE_BY_STATUS = {
    400: INVALID_REQUEST,
    401: INVALID_REQUEST,  # what api.openai.com sends for a bad key, with code "invalid_api_key"
    404: INVALID_REQUEST,
    405: INVALID_REQUEST,
    413: INVALID_REQUEST,
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error that goes to the client as an OpenAI error object with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,  # the wire name
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else INVALID_REQUEST)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
