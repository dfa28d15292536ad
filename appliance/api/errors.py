"""How the API says no: the documented error bodies and one sentence per validation failure."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from appliance.api.schemas import ErrorOut
from appliance.api.state import AppState

#: The ``responses=`` of every route that can refuse: OpenAPI documents the one error body.
ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut},
    422: {"model": ErrorOut},
    503: {"model": ErrorOut},
}


def validation_message(exc: ValidationError) -> str:
    """'field: what is wrong' for the first error, so a client sees which parameter to fix."""
    error = exc.errors()[0]
    return f"{'.'.join(map(str, error['loc'])) or 'query'}: {error['msg']}"


async def storage_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The store failed under a request: 503 saying what is wrong, never a 500."""
    state: AppState = request.app.state.appliance
    return JSONResponse({"detail": f"storage unavailable: {state.storage_trouble(exc)}"}, status_code=503)
