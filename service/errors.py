"""HTTP errors: every failure answers JSON `{"detail": "..."}` naming the field and the limit."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.encoding import json_response


class ApiError(Exception):
    """An answer other than 200, raised anywhere below the routes."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


def too_large(field: str, value: int, limit: int, setting: str) -> ApiError:
    return ApiError(413, f"{field}: {value} is over the limit of {limit} ({setting})")


def _location(loc: tuple) -> str:
    """("body", "x0", 3, 1) -> "x0[3][1]"."""
    text = ""
    for part in loc:
        if part == "body" and not text:
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def describe_validation(errors: list[dict]) -> str:
    """One line per problem, `field: message`; model-level checks already name their field."""
    lines = []
    for error in errors:
        message = error.get("msg", "invalid")
        kind = error.get("type", "")
        if kind == "json_invalid":
            lines.append(f"body: not valid JSON ({error.get('ctx', {}).get('error', message)})")
            continue
        if isinstance(error.get("input"), bytes | bytearray):
            lines.append("body: expected a JSON object sent with Content-Type: application/json")
            continue
        message = message.removeprefix("Value error, ")
        location = _location(tuple(error.get("loc", ())))
        if location == "body" and ":" in message.split(" ", 1)[0]:
            lines.append(message)  # a model validator that names its own field
        else:
            lines.append(f"{location}: {message}")
    return "; ".join(dict.fromkeys(lines))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> Response:
        return json_response({"detail": exc.detail}, exc.headers, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> Response:
        return json_response({"detail": describe_validation(list(exc.errors()))}, status=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI answers 400 for a body that is not text at all; like any malformed body: 422.
            return json_response({"detail": "body: not valid JSON (not UTF-8 text)"}, status=422)
        return json_response({"detail": str(exc.detail)}, exc.headers, exc.status_code)
