"""Settings checks shared by every program: URL validation and one clear exit for a bad value."""

from __future__ import annotations

from typing import TypeVar
from urllib.parse import urlsplit

from pydantic import ValidationError
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def check_url(value: str, schemes: tuple[str, ...]) -> str:
    """``value`` if it is a URL of one of ``schemes`` with a host; ValueError naming them otherwise."""
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"{value!r} is not a {'/'.join(schemes)} URL")
    return value


class SettingRejected(ValueError):
    """A setting that passed its checks but proved wrong once used (a URL speaking another
    protocol): the program says which and how to fix it, and exits 2 like a bad value at start."""


class ConfigError(SystemExit):
    """Bad configuration: exits with status 2 and a message naming each bad variable."""

    def __init__(self, exc: ValidationError, prefix: str, secrets: frozenset[str] = frozenset()) -> None:
        lines = []
        for err in exc.errors(include_url=False):
            field = str(err["loc"][0]) if err["loc"] else "?"
            secret = field in secrets or "token" in field or ("url" in field and "@" in str(err.get("input")))
            shown = "(secret)" if secret else repr(str(err.get("input"))[:60])
            lines.append(f"  {prefix}{field.upper()}: {err['msg']} (got {shown})")
        print("invalid configuration:\n" + "\n".join(lines), flush=True)
        super().__init__(2)


def load(cls: type[S], prefix: str, **overrides: object) -> S:
    """The settings from the environment (and ``overrides``), or exit 2 with what is wrong."""
    try:
        return cls(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        secrets = frozenset(k for k, f in cls.model_fields.items() if "SecretStr" in str(f.annotation))
        raise ConfigError(exc, prefix, secrets) from None
