"""How the API says no: one body everywhere, ``{"detail": "<one sentence>"}``, naming the parameter.

FastAPI's own validation errors (a list, with the regex that failed) are turned into that sentence
here, and query times are range-checked here before anything converts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from appliance.api.schemas import MODEL_PATTERN, ErrorOut
from appliance.api.state import AppState
from appliance.candles import PRODUCT_PATTERN, parse_time

#: The ``responses=`` of every route that can refuse: OpenAPI documents the one error body.
ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut},
    422: {"model": ErrorOut},
    429: {"model": ErrorOut},
    503: {"model": ErrorOut},
}
#: What a pattern accepts, in words (a client should not have to read a regex).
HINTS = {
    PRODUCT_PATTERN: "a Coinbase product id like BTC-USD",
    MODEL_PATTERN: "a model name like cnn or lasso (a-z, 0-9, _)",
}
#: The times an API parameter may name: 1970-01-01 .. 9999-12-31 (what dates and SQLite can hold).
LATEST_TIME = 253_402_300_799


def sentence(errors: Sequence[Mapping[str, Any]]) -> str:
    """'name: what is wrong and what is accepted', for the first error: which parameter to fix."""
    error = errors[0]
    loc = [str(part) for part in error.get("loc", ()) if part not in ("query", "path", "body")]
    name = ".".join(loc) or "query"
    given = error.get("input")
    shown = repr(given[:40] if isinstance(given, str) else given)
    pattern = (error.get("ctx") or {}).get("pattern")
    if error.get("type") == "missing":
        return f"{name}: required"
    if pattern is not None:
        return f"{name}: {shown} is not {HINTS.get(pattern, f'of the form {pattern}')}"
    return f"{name}: {error['msg'][0].lower()}{error['msg'][1:]}, not {shown}"


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": sentence(exc.errors())}, status_code=422)


def query_time(name: str, text: str) -> int:
    """Epoch seconds from a query parameter, checked before conversion; 422 naming ``name`` otherwise."""
    if not text.isascii() or len(text) > 40 or (text.isdigit() and len(text) > len(str(LATEST_TIME))):
        raise HTTPException(422, f"{name}: {text[:40]!r} is not an ISO-8601 time or epoch seconds "
                                 f"between 1970 and 9999")  # fmt: skip
    try:
        when = parse_time(text)
    except ValueError as exc:
        raise HTTPException(422, f"{name}: {exc}") from None
    if not 0 <= when <= LATEST_TIME:
        raise HTTPException(422, f"{name}: {text!r} is outside 1970-01-01 .. 9999-12-31")
    return when


async def storage_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The store failed under a request: 503 saying what is wrong, never a 500."""
    state: AppState = request.app.state.appliance
    return JSONResponse({"detail": f"storage unavailable: {state.storage_trouble(exc)}"}, status_code=503)
