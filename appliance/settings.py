"""The appliance's settings: one object, from ``CRYPTOPI_*`` environment variables, checked at start."""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from appliance.candles import HORIZONS, PRODUCT_PATTERN
from appliance.helpers.config import check_url, load

MODELS_DIR = Path(__file__).parent / "models"
#: Products one appliance ingests at most (one feed connection, one REST budget: see the README).
MAX_PRODUCTS = 50
#: A product id, or a pattern resolved against Coinbase's product list at start: ``*-USD``, ``BTC-*``.
PRODUCT_OR_PATTERN = r"^[A-Z0-9*?]{1,12}-[A-Z0-9*?]{1,12}$"
EXCHANGE_FEED_URL = "wss://ws-feed.exchange.coinbase.com"
#: Coinbase's other public feed: it speaks the Advanced Trade protocol, not the Exchange one.
ADVANCED_TRADE_HOST = "advanced-trade-ws.coinbase.com"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRYPTOPI_", extra="ignore", frozen=True)

    data_dir: Path = Field(Path("data"), description="Folder of the SQLite database (cryptopi.sqlite3)")
    products: Annotated[tuple[str, ...], NoDecode] = Field(
        ("BTC-USD", "ETH-USD"),
        description=f"Comma-separated Coinbase product ids or patterns (*-USD), at most {MAX_PRODUCTS}",
    )
    coinbase_ws_url: str = Field(
        EXCHANGE_FEED_URL, description="Exchange WebSocket feed (or a replay server)"
    )
    coinbase_rest_url: str = Field(
        "https://api.exchange.coinbase.com", description="Exchange REST API (or a replay server)"
    )
    minute_retention_days: float = Field(30.0, gt=0, description="Minute candles kept, in days of data")
    feed_watchdog_s: float = Field(10.0, gt=0, description="Reconnect when the feed is silent this long")
    reconnect_max_s: float = Field(30.0, gt=0, description="Cap of the reconnect back-off, in seconds")
    rest_rate_per_s: float = Field(10.0, gt=0, le=10, description="REST requests/s (Coinbase allows 10)")
    rest_timeout_s: float = Field(10.0, gt=0, description="Timeout of each REST request, in seconds")
    commit_interval_s: float = Field(
        300.0, gt=0, le=3600,
        description="Longest time trades wait uncommitted while they keep coming, in seconds (a close of "
        "the shortest horizon's candle commits at once); longer writes less to the SD card, and more is "
        "fetched again over REST after a crash",
    )  # fmt: skip
    feed_buffer_frames: int = Field(
        10_000, ge=1, le=1_000_000, description="Feed messages held while ingest is busy or repairing"
    )
    http_host: str = Field("0.0.0.0", description="Address the API and dashboard listen on")
    http_port: int = Field(8000, ge=1, le=65535, description="Port the API and dashboard listen on")
    public_url: str | None = Field(
        None, description="Where users reach the dashboard (Home Assistant links to it); "
        "default http://<host>:<port>/ from the HTTP settings"
    )  # fmt: skip
    # The HTTP edge (appliance/api/server.py, appliance/api/edge.py): what any one client can cost.
    http_max_connections: int = Field(
        800,
        ge=1,
        le=60_000,
        description="Open connections (HTTP and WebSocket); past it idle ones give way, or 503",
    )
    http_header_timeout_s: float = Field(10.0, gt=0, le=300, description="Time to send a request's headers")
    http_keepalive_s: float = Field(5.0, gt=0, le=300, description="Idle keep-alive connections close after")
    http_max_header_bytes: int = Field(16_384, ge=1024, le=1 << 20, description="Request line + headers")
    http_max_headers: int = Field(64, ge=8, le=1000, description="Header fields in one request")
    ws_max_message_bytes: int = Field(
        4096, ge=256, le=1 << 20, description="Largest message a client may send"
    )
    http_rate_per_s: float = Field(10.0, gt=0, le=100_000, description="Requests per second per client")
    http_rate_burst: int = Field(60, ge=1, le=100_000, description="Requests a client may send at once")
    http_streams_per_client: int = Field(8, ge=1, le=10_000, description="Open /api/stream per public client")
    http_local_networks: Annotated[tuple[str, ...], NoDecode] = Field(
        ("127.0.0.0/8", "::1/128"),
        description="Clients served /metrics and /docs, never rate-limited (unless through the tunnel)",
    )
    build: str = Field("dev", max_length=100, description="Version and commit (set by the image)")
    models_dir: Path = Field(
        MODELS_DIR, description="Model registry to serve from (the default is the one shipped inside)"
    )
    history_days: int = Field(3, ge=2, le=300, description="Hourly history back-filled on first start")
    horizons: Annotated[tuple[int, ...], NoDecode] = Field(
        (3600, 900), description="Candle lengths predicted, in seconds, comma-separated: 3600 and/or 900"
    )
    mqtt_url: str | None = Field(
        None, description="mqtt://[user:pass@]host[:port] or mqtts://…; off if unset"
    )
    mqtt_device_id: str = Field(
        "cryptopi", pattern=r"^[A-Za-z0-9_-]{1,40}$", description="Device name in MQTT topics and ids"
    )
    mqtt_discovery_prefix: str = Field(
        "homeassistant", pattern=r"^[A-Za-z0-9_/-]{1,60}$", description="Home Assistant's discovery prefix"
    )
    mqtt_ca_file: str | None = Field(None, description="CA bundle for mqtts:// (unset: the system's)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="DEBUG, INFO, ...")
    log_format: Literal["logfmt", "json"] = Field("logfmt", description="logfmt or json, on stderr")

    @field_validator("products", "http_local_networks", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @field_validator("horizons", mode="before")
    @classmethod
    def _split_horizons(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = tuple(int(g) for g in value.split(",") if g.strip())
            except ValueError:
                raise ValueError("comma-separated seconds, e.g. 3600,900") from None
        return value

    @field_validator("horizons")
    @classmethod
    def _check_horizons(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or len(set(value)) != len(value) or not set(value) <= set(HORIZONS):
            raise ValueError(f"one or more of {', '.join(map(str, HORIZONS))}, each once")
        return value

    @field_validator("products")
    @classmethod
    def _check_products(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name at least one product, e.g. BTC-USD")
        for product in value:
            if not re.match(PRODUCT_OR_PATTERN, product):
                raise ValueError(
                    f"{product!r} is not a Coinbase product id like BTC-USD (or a pattern: *-USD)"
                )
        if len(set(value)) != len(value):
            raise ValueError("a product is listed twice")
        if len(value) > MAX_PRODUCTS:
            raise ValueError(f"{len(value)} products; at most {MAX_PRODUCTS}")
        return value

    @property
    def product_patterns(self) -> tuple[str, ...]:
        """The entries of ``products`` that are patterns (resolved at start: :mod:`appliance.products`)."""
        return tuple(p for p in self.products if not re.match(PRODUCT_PATTERN, p))

    @field_validator("http_local_networks")
    @classmethod
    def _check_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for network in value:
            try:
                ipaddress.ip_network(network)
            except ValueError:
                raise ValueError(f"{network!r} is not a network like 192.168.1.0/24") from None
        return value

    @field_validator("coinbase_ws_url")
    @classmethod
    def _check_ws_url(cls, value: str) -> str:
        if urlsplit(value).hostname == ADVANCED_TRADE_HOST:
            raise ValueError(
                f"{ADVANCED_TRADE_HOST} is Coinbase's Advanced Trade feed, another protocol; "
                f"cryptopi reads the Exchange feed: {EXCHANGE_FEED_URL}"
            )
        return check_url(value, ("ws", "wss"))

    @field_validator("coinbase_rest_url")
    @classmethod
    def _check_rest_url(cls, value: str) -> str:
        return check_url(value, ("http", "https"))

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        return check_url(value, ("http", "https")) if value else None

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str | None) -> str | None:
        return check_url(value, ("mqtt", "mqtts")) if value else None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "cryptopi.sqlite3"

    @property
    def dashboard_url(self) -> str:
        """``public_url``, else this host's address: its name when the API listens on every address."""
        if self.public_url:
            return self.public_url
        host = socket.gethostname() if self.http_host in ("0.0.0.0", "::", "") else self.http_host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.http_port}/"


def load_settings(**overrides: object) -> Settings:
    return load(Settings, "CRYPTOPI_", **overrides)
