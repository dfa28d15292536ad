"""Who hears of a deploy: Apprise (ntfy, Telegram, e-mail, …) and MQTT, with a Home Assistant update entity.

Both are called on every change of a deployment's state, from the deploy thread; both are best effort
(a notification that cannot be sent is logged, never fails the deploy).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import paho.mqtt.client as mqtt

from appliance.helpers.mqtt import HA_STATUS, came_online, go_offline, ha_device, ha_entity_id, mqtt_client
from webhook.metrics import NOTIFICATIONS
from webhook.records import ENDED, UNDER_WAY, Deployment
from webhook.settings import split_urls

log = logging.getLogger(__name__)

#: The outcomes worth a push notification.
NOTIFIED = ("succeeded", "rolled_back", "failed")


def _version(version: str | None, digest: str | None) -> str:
    short = digest.removeprefix("sha256:")[:12] if digest else "no digest"
    return f"{version or 'unlabelled'} ({short})"


def summary(d: Deployment) -> tuple[str, str]:
    """A notification's title and body: what ran, what was tried, how it ended and why."""
    before = _version(d.before_version, d.before_digest)
    after = _version(d.after_version, d.after_digest)
    running = after if d.state == "succeeded" else before
    title = f"cryptopi deploy {d.state.replace('_', ' ')}: {d.after_version or '?'}"
    lines = [f"Deployment {d.id} ({d.trigger} of {d.trigger_tag}) {d.state}.",
             f"Before: {before}", f"New: {after}", f"Running now: {running}"]  # fmt: skip
    if d.error:
        lines.append(f"Reason: {d.error}")
    if d.bytes_freed:
        lines.append(f"Pruned {d.images_removed} old image(s), {d.bytes_freed / 1e6:.0f} MB freed.")
    return title, "\n".join(lines)


class AppriseNotifier:
    def __init__(self, urls: str) -> None:
        import apprise

        self._apprise = apprise
        self._notifier = apprise.Apprise()
        for url in split_urls(urls):
            self._notifier.add(url)

    def __call__(self, d: Deployment) -> None:
        if d.state not in NOTIFIED:
            return
        kind = {"succeeded": "SUCCESS", "rolled_back": "WARNING"}.get(d.state, "FAILURE")
        title, body = summary(d)
        sent = self._notifier.notify(
            body=body, title=title, notify_type=getattr(self._apprise.NotifyType, kind)
        )
        NOTIFICATIONS.labels("sent" if sent else "failed").inc()
        if not sent:
            log.warning("notification not sent (Apprise logged why)", extra={"deployment": d.id})


class MqttNotifier:
    """``cryptopi/<device>/deployment`` (each ended deployment, retained) and an HA ``update`` entity.

    The entity shows the installed version (what runs) beside the latest one pulled, and whether a
    deploy is under way; it is announced on every connect and when Home Assistant comes online.
    """

    def __init__(self, url: str, device_id: str, discovery_prefix: str = "homeassistant") -> None:
        self.device = device_id
        self.slug = device_id.lower()
        self.state_topic = f"cryptopi/{device_id}/update"
        self.status_topic = f"cryptopi/{device_id}/webhook"
        self.config_topic = f"{discovery_prefix}/update/cryptopi_{self.slug}/appliance/config"
        self.installed: str | None = None
        self.latest: str | None = None
        self._state: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.client, self.broker = mqtt_client(url, f"cryptopi-webhook-{device_id}")
        self.client.will_set(self.status_topic, "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.max_queued_messages_set(100)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def start(self, installed: str | None) -> None:
        self.installed = self.latest = installed
        self._set_state(in_progress=False, release_summary=None)
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()

    def stop(self) -> None:
        """Say ``offline`` (retained) before leaving: the update entity turns unavailable at once."""
        go_offline(self.client, self.status_topic)

    def __call__(self, d: Deployment) -> None:
        if d.after_version:
            self.latest = d.after_version
        if d.state in ("succeeded", "unchanged") and d.after_version:
            self.installed = d.after_version
        elif self.installed is None and d.before_version:
            self.installed = d.before_version
        note = f"{d.state}: {d.error}" if d.error else d.state
        self._set_state(in_progress=d.state in UNDER_WAY, release_summary=note[:255])
        if d.state in ENDED:
            self.client.publish(f"cryptopi/{self.device}/deployment", d.model_dump_json(), qos=1, retain=True)

    def discovery_config(self) -> dict[str, Any]:
        return {
            "name": "Appliance image",  # shown after the device's name, as the appliance's own entities
            "unique_id": f"cryptopi_{self.slug}_appliance_image",
            **ha_entity_id("update", f"{self.slug}_appliance_image"),
            "state_topic": self.state_topic,
            "device_class": "firmware",
            "entity_category": "diagnostic",
            "availability_topic": self.status_topic,
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": ha_device(self.device),  # the appliance's device: one device in Home Assistant
            "origin": {"name": "cryptopi webhook"},
        }

    def _set_state(self, **fields: Any) -> None:
        with self._lock:
            self._state = {"installed_version": self.installed, "latest_version": self.latest,
                           "title": "cryptopi appliance", **fields}  # fmt: skip
            payload = json.dumps(self._state)
        self.client.publish(self.state_topic, payload, qos=1, retain=True)

    def _announce(self, client: mqtt.Client) -> None:
        client.publish(self.config_topic, json.dumps(self.discovery_config()), qos=1, retain=True)
        with self._lock:
            payload = json.dumps(self._state)
        client.publish(self.state_topic, payload, qos=1, retain=True)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if not came_online(client, reason, self.status_topic):
            return
        self._announce(client)
        log.info("mqtt connected", extra={"broker": str(self.broker)})

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == HA_STATUS and message.payload == b"online":
            self._announce(client)
