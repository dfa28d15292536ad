"""One way from an ``mqtt://`` or ``mqtts://`` URL to a paho client, for the appliance and the webhook,
and the Home Assistant discovery keys both must spell alike (one device, stable entity ids).

Nothing here publishes or counts: each program adds its own topics and metrics on top.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

SCHEMES = ("mqtt", "mqtts")
#: Home Assistant publishes ``online`` here when it starts: discovery configs are then sent again.
HA_STATUS = "homeassistant/status"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ValueError(f"{url!r} is not an mqtt:// or mqtts:// URL")
        tls = parts.scheme == "mqtts"
        return cls(
            parts.hostname or "localhost",
            parts.port or (8883 if tls else 1883),
            tls,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:  # never the credentials: this goes into logs and /health
        return f"{self.host}:{self.port}"


def mqtt_client(url: str, client_id: str, *, ca_file: str | None = None) -> tuple[mqtt.Client, BrokerAddress]:
    """A paho client (callback API v2) with the URL's credentials and TLS set, not yet connected."""
    broker = BrokerAddress.from_url(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        client.tls_set(ca_certs=ca_file)
    return client, broker


def came_online(client: mqtt.Client, reason: Any, status_topic: str) -> bool:
    """On (re)connect: False, logged, if the broker refused; else follow Home Assistant's restarts and
    say ``online`` (retained) on ``status_topic``, the last will's topic."""
    if reason.is_failure:
        log.error("mqtt connect refused", extra={"reason": str(reason)})
        return False
    client.subscribe(HA_STATUS, qos=1)
    client.publish(status_topic, "online", qos=1, retain=True)
    return True


def go_offline(client: mqtt.Client, status_topic: str) -> None:
    """Publish ``offline`` (retained) and wait briefly for it before disconnecting: a last will is only
    sent for an unclean end, so without this a clean stop would leave the entity looking online."""
    info = client.publish(status_topic, "offline", qos=1, retain=True)
    if client.is_connected():
        with contextlib.suppress(RuntimeError, ValueError):  # queued while disconnected: no wait
            info.wait_for_publish(timeout=2)
    client.disconnect()
    client.loop_stop()


def ha_device(device_id: str) -> dict[str, Any]:
    """The device block of every discovery config from this appliance (the webhook's too): one device.

    Named for the appliance, plainly: Home Assistant puts the device's name before each entity's, so
    the entity names must not repeat it either.
    """
    return {"identifiers": [f"cryptopi_{device_id.lower()}"], "name": device_id, "manufacturer": "cryptopi"}


def ha_entity_id(component: str, object_id: str) -> dict[str, str]:
    """Both keys that fix a discovered entity's id: Home Assistant before 2025.10 reads ``object_id``;
    2025.10 on reads ``default_entity_id`` (and ignores ``object_id``; 2026.4 drops it, silently)."""
    object_id = object_id.lower().replace("-", "_")
    return {"object_id": object_id, "default_entity_id": f"{component}.{object_id}"}
