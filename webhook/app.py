"""The receiver's HTTP side: Docker Hub's push hook, the deployment list, liveness and metrics.

Only the hook path is meant to be public (through the tunnel). A wrong token is answered exactly like
a path that does not exist, and nothing else happens.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Annotated, Literal

from fastapi import FastAPI, Header, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from webhook.deployer import Deployer
from webhook.metrics import HOOK_REQUESTS
from webhook.payload import MAX_BODY_BYTES, REPLAYED, BadPayload, ignore_reason, parse_push
from webhook.records import Deployment, Records
from webhook.settings import WebhookSettings

log = logging.getLogger(__name__)


class HookAnswer(BaseModel):
    status: Literal["accepted", "ignored"]
    reason: str | None = Field(None, description="Why nothing will be deployed")
    deployment: int | None = Field(None, description="The deployment this push triggers or joins")
    coalesced: bool = Field(False, description="Joined a deployment already queued")


class ErrorOut(BaseModel):
    detail: str


def create_app(settings: WebhookSettings, records: Records, deployer: Deployer) -> FastAPI:
    app = FastAPI(
        title="cryptopi webhook",
        description="Docker Hub push → pull, redeploy, health gate, rollback.",
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    secret = settings.token.get_secret_value().encode()

    def is_token(candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), secret)

    def refuse(status: int, outcome: str, detail: str, **extra: object) -> HTTPException:
        HOOK_REQUESTS.labels(outcome).inc()
        log.warning("hook refused", extra={"outcome": outcome, "detail": detail, **extra})
        return HTTPException(status, detail)

    @app.post(
        "/hooks/dockerhub/{token}",
        status_code=202,
        response_model=HookAnswer,
        responses={400: {"model": ErrorOut}, 404: {"model": ErrorOut}, 413: {"model": ErrorOut}},
    )
    async def dockerhub(token: str, request: Request) -> HookAnswer:
        """Docker Hub's push webhook: the payload is a trigger only (it is unsigned)."""
        if not is_token(token):
            raise refuse(
                404, "wrong_token", "Not Found", client=request.client.host if request.client else ""
            )
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
        now = time.time()
        reason = ignore_reason(push, repository=settings.repository, tag_pattern=settings.tag_pattern,
                               now=now, max_age_s=settings.max_push_age_s)  # fmt: skip
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
        log.info("push accepted", extra={"tag": tag, "deployment": deployment.id, "coalesced": coalesced})
        return HookAnswer(status="accepted", deployment=deployment.id, coalesced=coalesced)

    @app.get("/deployments", response_model=list[Deployment], responses={401: {"model": ErrorOut}})
    async def deployments(authorization: Annotated[str, Header()] = "") -> list[Deployment]:
        """The newest deployments first (send ``Authorization: Bearer <token>``)."""
        scheme, _, candidate = authorization.partition(" ")
        if scheme.lower() != "bearer" or not is_token(candidate.strip()):
            raise HTTPException(401, "send Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"})
        return records.recent()

    @app.get("/livez")
    async def livez() -> dict[str, bool]:
        return {"alive": True}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
