"""The webhook's settings: one object, from ``CRYPTOPI_WEBHOOK_*`` variables, checked at start."""

from __future__ import annotations

import re
import shlex
from datetime import time
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from appliance.helpers.config import check_url, load
from appliance.helpers.mqtt import SCHEMES as MQTT_SCHEMES

PREFIX = "CRYPTOPI_WEBHOOK_"
#: A Docker Hub repository name, as Docker's reference grammar has it (no "..", no leading "/").
REPOSITORY_PATTERN = r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$"
#: 32 random bytes in URL-safe base64 are 43 characters.
TOKEN_MIN_CHARS = 43
#: What compose.yaml reads for the image that passed the gate (``image@sha256:…``), from the pin file.
PIN_VARIABLE = "CRYPTOPI_DEPLOYED_IMAGE"


class WebhookSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True)

    token: SecretStr = Field(description="Secret in the hook URL; `python -m webhook init` makes one")
    repository: str = Field(pattern=REPOSITORY_PATTERN, description="Docker Hub repository, e.g. me/cryptopi")
    tag_pattern: str = Field("latest", description="Regex a pushed tag must match in full to deploy")
    host: str = Field("127.0.0.1", description="The hook's listener: the tunnel's origin")
    port: int = Field(8081, ge=1, le=65535)
    admin_host: str = Field("127.0.0.1", description="The local-only listener: /deployments, /metrics, /docs")
    admin_port: int = Field(8082, ge=1, le=65535)
    public_url: str = Field("https://hooks.example.com", description="Where the tunnel publishes this server")
    compose_file: Path = Path("/opt/cryptopi/compose.yaml")
    compose_project: str = Field("cryptopi", pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    compose_env_file: Path | None = Field(
        Path("/etc/cryptopi/cryptopi.env"), description="--env-file for compose (the stack's variables)"
    )
    compose_command: str = Field("docker compose", description="How to run Compose v2")
    service: str = Field("appliance", pattern=r"^[a-zA-Z0-9._-]{1,63}$")
    health_timeout_s: float = Field(180.0, gt=0, description="How long a new container has to turn healthy")
    max_push_age_s: float = Field(3600.0, gt=0, description="Older pushes are ignored as stale or replayed")
    poll_s: float = Field(
        900.0, ge=0, description="Ask the registry for the tag's digest this often; 0: never"
    )
    keep_images: int = Field(3, ge=1, le=50, description="Images that passed the gate kept for rollback")
    quiet_minutes: str = Field("58-02", pattern=r"^([0-5][0-9]-[0-5][0-9])?$",
                               description="Minutes of each hour with no recreate; empty: none")  # fmt: skip
    maintenance_window: str | None = Field(
        None,
        pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]-([01][0-9]|2[0-3]):[0-5][0-9]$",
        description="Recreate only inside HH:MM-HH:MM (in `timezone`); unset: any time",
    )
    timezone: str = Field("UTC", description="IANA zone of the maintenance window, e.g. Europe/Berlin")
    notify_urls: SecretStr | None = Field(
        None, description="Apprise URLs (comma or space separated) told of succeeded, rolled_back, failed"
    )
    state_dir: Path = Field(Path("/var/lib/cryptopi-webhook"), description="Deployment records (SQLite)")
    mqtt_url: str | None = Field(None, description="mqtt://[user:pass@]host[:port] or mqtts://…")
    mqtt_device_id: str = Field("cryptopi", pattern=r"^[A-Za-z0-9_-]{1,40}$")
    mqtt_discovery_prefix: str = Field("homeassistant", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["logfmt", "json"] = "logfmt"

    @model_validator(mode="after")
    def _check_listeners(self) -> WebhookSettings:
        if self.port == self.admin_port:
            raise ValueError("CRYPTOPI_WEBHOOK_PORT and CRYPTOPI_WEBHOOK_ADMIN_PORT must differ: the hook's "
                             "listener is the tunnel's, the other is local only")  # fmt: skip
        return self

    @field_validator("token")
    @classmethod
    def _check_token(cls, value: SecretStr) -> SecretStr:
        secret = value.get_secret_value()
        if len(secret) < TOKEN_MIN_CHARS or not re.fullmatch(r"[A-Za-z0-9_-]+", secret):
            raise ValueError(
                f"need at least {TOKEN_MIN_CHARS} URL-safe characters (32 random bytes): "
                "run `python -m webhook init`"
            )
        return value

    @field_validator("tag_pattern")
    @classmethod
    def _check_tag_pattern(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone such as Europe/Berlin") from None
        return value

    @field_validator("maintenance_window")
    @classmethod
    def _check_maintenance_window(cls, value: str | None) -> str | None:
        if value is not None and value[:5] == value[6:]:
            raise ValueError("an empty window: no recreate would ever happen (unset it for any time)")
        return value

    @field_validator("notify_urls")
    @classmethod
    def _check_notify_urls(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        import apprise  # slow to import (about a second): only when notifications are on

        for i, url in enumerate(split_urls(value.get_secret_value()), 1):
            if apprise.Apprise.instantiate(url) is None:  # the URL itself is not echoed: it holds secrets
                raise ValueError(f"URL {i} is not one Apprise knows (see its wiki for the formats)")
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str | None) -> str | None:
        return check_url(value, MQTT_SCHEMES) if value else None

    @property
    def quiet(self) -> tuple[int, int] | None:
        """The hourly quiet minutes as (first, end): "58-02" is :58:00 up to :02:00."""
        if not self.quiet_minutes:
            return None
        first, end = self.quiet_minutes.split("-")
        return int(first), int(end)

    @property
    def maintenance(self) -> tuple[time, time] | None:
        if self.maintenance_window is None:
            return None
        start, end = (time.fromisoformat(t) for t in self.maintenance_window.split("-"))
        return start, end

    @property
    def pin_file(self) -> Path:
        """The digest that passed the gate, as compose reads it (cryptopi.service's EnvironmentFile)."""
        return self.state_dir / "deployed.env"

    @property
    def compose(self) -> list[str]:
        """The compose command line up to the subcommand, the same for every call."""
        args = [*shlex.split(self.compose_command), "--project-name", self.compose_project]
        if self.compose_env_file:
            args += ["--env-file", str(self.compose_env_file)]
        return [*args, "--file", str(self.compose_file)]

    def hook_url(self) -> str:
        return f"{self.public_url.rstrip('/')}/hooks/dockerhub/{self.token.get_secret_value()}"


def split_urls(text: str) -> list[str]:
    return [u for u in re.split(r"[,\s]+", text) if u]


def load_settings(**overrides: object) -> WebhookSettings:
    return load(WebhookSettings, PREFIX, **overrides)
