"""The tag's current digest, straight from the registry: one HEAD on its manifest (the polling fallback).

Docker Hub does not retry a webhook it could not deliver, so the receiver also asks now and then. A HEAD
is what Docker Hub documents as not counted against its pull rate limit; a 429 is honoured (its
``Retry-After``, else an hour). Credentials are the docker CLI's own (``docker login`` for the
webhook's ``DOCKER_CONFIG``), read through the docker SDK, credential helpers included.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Generator
from urllib.parse import urlsplit

import docker.auth
import httpx

#: What a multi-arch push (an index) and a single-platform one (a manifest) are served as.
ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])  # fmt: skip
DOCKER_HUB = "registry-1.docker.io"


class RegistryError(RuntimeError):
    """The registry could not say; the message says why."""


class RateLimited(RegistryError):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"rate limited by the registry: next try in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


def locate(reference: str) -> tuple[str, str, str]:
    """'host:5000/ns/app:v2' -> (registry host, repository path, tag), with Docker's defaults."""
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:
        name, tag = reference, "latest"
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        host, path = first, rest
    else:
        host, path = "docker.io", name
    if host in ("docker.io", "index.docker.io"):
        host = DOCKER_HUB
        path = path if "/" in path else f"library/{path}"
    return host, path, tag


def _plain_http(host: str) -> bool:
    """Docker's own rule: registries on loopback are spoken to without TLS."""
    hostname = urlsplit(f"//{host}").hostname or ""
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


class BearerChallenge(httpx.Auth):
    """The registry token flow: a 401 names a token service; fetch a token there, send it again."""

    requires_response_body = True

    def __init__(self, credentials: tuple[str, str] | None) -> None:
        self.credentials = credentials
        self.token: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.token:
            request.headers["Authorization"] = f"Bearer {self.token}"
        response = yield request
        challenge = response.headers.get("www-authenticate", "")
        if response.status_code != 401 or not challenge.lower().startswith("bearer "):
            return
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            return
        token_request = httpx.Request("GET", realm, params=params)
        if self.credentials:
            basic = base64.b64encode(":".join(self.credentials).encode()).decode()
            token_request.headers["Authorization"] = f"Basic {basic}"
        token_response = yield token_request
        if token_response.status_code != 200:
            return
        body = token_response.json()
        self.token = body.get("token") or body.get("access_token")
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


class Registry:
    def __init__(self, reference: str, timeout_s: float = 20) -> None:
        self.host, self.path, self.tag = locate(reference)
        scheme = "http" if _plain_http(self.host) else "https"
        self.url = f"{scheme}://{self.host}/v2/{self.path}/manifests/{self.tag}"
        self._client = httpx.Client(auth=BearerChallenge(_credentials(self.host)), timeout=timeout_s,
                                    headers={"Accept": ACCEPT})  # fmt: skip

    def close(self) -> None:
        self._client.close()

    def digest(self) -> str:
        """The digest the tag points at now."""
        try:
            r = self._client.head(self.url)
        except httpx.HTTPError as exc:
            raise RegistryError(f"HEAD {self.url}: {type(exc).__name__}: {exc}") from None
        if r.status_code == 429:
            retry = r.headers.get("retry-after", "")
            raise RateLimited(float(retry) if retry.isdigit() else 3600.0)
        if r.status_code != 200:
            raise RegistryError(f"HEAD {self.url}: HTTP {r.status_code}")
        digest = r.headers.get("docker-content-digest", "")
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise RegistryError(f"HEAD {self.url}: no Docker-Content-Digest in the answer")
        return str(digest)


def _credentials(host: str) -> tuple[str, str] | None:
    """The docker CLI's login for this registry, if there is one."""
    index = "https://index.docker.io/v1/" if host == DOCKER_HUB else host
    try:
        auth = docker.auth.load_config().resolve_authconfig(index)
    except Exception:  # a broken config.json or credential helper: ask anonymously
        return None
    if not auth or not auth.get("username") or not auth.get("password"):
        return None
    return str(auth["username"]), str(auth["password"])
