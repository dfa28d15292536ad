"""The webhook's settings: one object, from ``CRYPTOPI_WEBHOOK_*`` variables, checked at start."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from appliance.helpers.config import check_url, load
from appliance.helpers.mqtt import SCHEMES as MQTT_SCHEMES

PREFIX = "CRYPTOPI_WEBHOOK_"
#: A Docker Hub repository name, as Docker's reference grammar has it (no "..", no leading "/").
REPOSITORY_PATTERN = r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*$"
#: 32 random bytes in URL-safe base64 are 43 characters.
TOKEN_MIN_CHARS = 43


class WebhookSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True)

    token: SecretStr = Field(description="Secret in the hook URL; `python -m webhook init` makes one")
    repository: str = Field(pattern=REPOSITORY_PATTERN, description="Docker Hub repository, e.g. me/cryptopi")
    tag_pattern: str = Field("latest", description="Regex a pushed tag must match in full to deploy")
    host: str = "127.0.0.1"
    port: int = Field(8081, ge=1, le=65535)
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
    state_dir: Path = Field(Path("/var/lib/cryptopi-webhook"), description="Deployment records (SQLite)")
    mqtt_url: str | None = Field(None, description="mqtt://[user:pass@]host[:port] or mqtts://…")
    mqtt_device_id: str = Field("cryptopi", pattern=r"^[A-Za-z0-9_-]{1,40}$")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["logfmt", "json"] = "logfmt"

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

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str | None) -> str | None:
        return check_url(value, MQTT_SCHEMES) if value else None

    @property
    def compose(self) -> list[str]:
        """The compose command line up to the subcommand, the same for every call."""
        args = [*shlex.split(self.compose_command), "--project-name", self.compose_project]
        if self.compose_env_file:
            args += ["--env-file", str(self.compose_env_file)]
        return [*args, "--file", str(self.compose_file)]

    def hook_url(self) -> str:
        return f"{self.public_url.rstrip('/')}/hooks/dockerhub/{self.token.get_secret_value()}"


def load_settings(**overrides: object) -> WebhookSettings:
    return load(WebhookSettings, PREFIX, **overrides)
