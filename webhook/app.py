"""The receiver's HTTP side: two listeners of one server.

* The hook listener (``CRYPTOPI_WEBHOOK_PORT``, the tunnel's origin) answers exactly one thing,
  ``POST /hooks/dockerhub/<token>``. Anything else, a wrong token, another method or a trailing slash,
  is a 404 like any unknown path: no redirect is ever built from the request's ``Host``.
* The local listener (``CRYPTOPI_WEBHOOK_ADMIN_PORT``, never published) has the deployment list, the
  deploy command, liveness, metrics and the docs, and refuses whatever came through the tunnel
  (``appliance.helpers.local_only``).
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.helpers.local_only import LocalOnly
from appliance.logs import ThrottledLog
from webhook.clock import Clock
from webhook.deployer import Deployer
from webhook.metrics import CLOCK_SYNCED, HOOK_REQUESTS, LOCAL_ONLY_REFUSED
from webhook.payload import MAX_BODY_BYTES, REPLAYED, BadPayload, ignore_reason, parse_push
from webhook.records import Deployment, Records
from webhook.settings import WebhookSettings

log = logging.getLogger(__name__)
#: A flood of wrong tokens (a scanner) logs one line a minute, with the count of the others.
WRONG_TOKEN_LOG_INTERVAL_S = 60.0
TELEMETRY_OFF: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}


class HookAnswer(BaseModel):
    status: Literal["accepted", "ignored"]
    reason: str | None = Field(None, description="Why nothing will be deployed")
    deployment: int | None = Field(None, description="The deployment this push triggers or joins")
    coalesced: bool = Field(False, description="Joined a deployment already waiting")


class DeployAnswer(BaseModel):
    deployment: int
    coalesced: bool


class ErrorOut(BaseModel):
    detail: str


def create_hook_app(settings: WebhookSettings, records: Records, deployer: Deployer, clock: Clock) -> FastAPI:
    app = FastAPI(title="cryptopi webhook (hook)", openapi_url=None, docs_url=None, redoc_url=None,
                  redirect_slashes=False, telemetry=TELEMETRY_OFF)  # fmt: skip
    secret = settings.token.get_secret_value().encode()
    wrong_tokens = ThrottledLog(log, WRONG_TOKEN_LOG_INTERVAL_S)

    @app.exception_handler(StarletteHTTPException)
    async def not_found(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Another method on the hook path says as little as an unknown path: 404, not 405.
        status = 404 if exc.status_code == 405 else exc.status_code
        return JSONResponse({"detail": "Not Found" if status == 404 else exc.detail}, status_code=status)

    def refuse(status: int, outcome: str, detail: str) -> HTTPException:
        HOOK_REQUESTS.labels(outcome).inc()
        log.warning("hook refused", extra={"outcome": outcome, "detail": detail})
        return HTTPException(status, detail)

    @app.post("/hooks/dockerhub/{token}", status_code=202, response_model=HookAnswer)
    async def dockerhub(token: str, request: Request) -> HookAnswer:
        """Docker Hub's push webhook: the payload is a trigger only (it is unsigned)."""
        if not hmac.compare_digest(token.encode(), secret):
            HOOK_REQUESTS.labels("wrong_token").inc()
            wrong_tokens.warning("wrong_token", "hook refused: wrong token", outcome="wrong_token",
                                 client=request.client.host if request.client else "")  # fmt: skip
            raise HTTPException(404, "Not Found")
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit():
            raise refuse(400, "bad_payload", "Content-Length is not a number")
        too_large = f"body over {MAX_BODY_BYTES} bytes"
        if int(declared) > MAX_BODY_BYTES:
            raise refuse(413, "too_large", too_large)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise refuse(413, "too_large", too_large)
        try:
            push = parse_push(bytes(body))
        except BadPayload as exc:
            raise refuse(400, "bad_payload", str(exc)) from None
        tag, pushed_at = push.push_data.tag, push.push_data.pushed_at
        now, synced = clock.time(), clock.synchronized()
        CLOCK_SYNCED.set(synced)
        reason = ignore_reason(push, repository=settings.repository, tag_pattern=settings.tag_pattern,
                               now=now, max_age_s=settings.max_push_age_s, clock_synced=synced)  # fmt: skip
        # A push is remembered (against replays) only once it is otherwise one that deploys; pushes
        # older than the age limit are forgotten, the limit refuses them anyway.
        if reason is None and not records.remember_push(tag, pushed_at, now - settings.max_push_age_s):
            reason = REPLAYED
        if reason is not None:
            HOOK_REQUESTS.labels("ignored").inc()
            log.info("push ignored", extra={"tag": tag, "reason": reason})
            return HookAnswer(status="ignored", reason=reason)
        deployment, coalesced = deployer.request(tag, pushed_at)
        HOOK_REQUESTS.labels("accepted").inc()
        unsynced = {} if synced else {"clock": "unsynchronized: age not checked"}
        fields = {"tag": tag, "deployment": deployment.id, "coalesced": coalesced, **unsynced}
        log.info("push accepted", extra=fields)
        return HookAnswer(status="accepted", deployment=deployment.id, coalesced=coalesced)

    return app


def create_admin_app(settings: WebhookSettings, records: Records, deployer: Deployer) -> ASGIApp:
    app = FastAPI(title="cryptopi webhook (local)", telemetry=TELEMETRY_OFF,
                  description="Deployments, deploys by hand, liveness, metrics: local only.")  # fmt: skip
    secret = settings.token.get_secret_value().encode()

    async def bearer(authorization: Annotated[str, Header()] = "") -> None:
        scheme, _, candidate = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(candidate.strip().encode(), secret):
            raise HTTPException(401, "send Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"})

    authorized = [Depends(bearer)]
    errors: dict[int | str, dict[str, object]] = {401: {"model": ErrorOut}}

    @app.get("/deployments", response_model=list[Deployment], dependencies=authorized, responses=errors)
    async def deployments() -> list[Deployment]:
        """The newest deployments first (send ``Authorization: Bearer <token>``)."""
        return records.recent()

    @app.get("/deployments/{deployment_id}", response_model=Deployment, dependencies=authorized,
             responses={**errors, 404: {"model": ErrorOut}})  # fmt: skip
    async def deployment(deployment_id: int) -> Deployment:
        found = records.get(deployment_id)
        if found is None:
            raise HTTPException(404, f"no deployment {deployment_id}")
        return found

    @app.post("/deploy", response_model=DeployAnswer, status_code=202, dependencies=authorized,
              responses=errors)  # fmt: skip
    async def deploy(now: bool = False) -> DeployAnswer:
        """Deploy the tag compose names, through the same gate (``now``: even outside the deploy windows)."""
        d, coalesced = deployer.request("(manual)", deployer.clock.time(), "manual", force=now)
        log.info("deploy asked for by hand", extra={"deployment": d.id, "now": now, "coalesced": coalesced})
        return DeployAnswer(deployment=d.id, coalesced=coalesced)

    @app.get("/livez")
    async def livez() -> dict[str, bool]:
        return {"alive": True}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    def refused(path: str) -> None:
        LOCAL_ONLY_REFUSED.inc()
        log.warning("local-only route asked through the tunnel", extra={"path": path[:200]})

    return LocalOnly(app, on_refused=refused)


def by_listener(apps: dict[int, ASGIApp]) -> ASGIApp:
    """One server, several listening sockets: each request goes to the app of the port it came in on."""

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server") or ("", 0)
        app = apps.get(int(server[1])) if scope["type"] != "lifespan" else None
        if app is None:
            if scope["type"] == "http":
                await JSONResponse({"detail": "Not Found"}, status_code=404)(scope, receive, send)
            return
        await app(scope, receive, send)

    return dispatch
