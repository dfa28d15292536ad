"""``python -m webhook``: serve the Docker Hub hook (what the systemd unit runs); ``init``: make a token;
``deploy``: a gated deploy now, through the running webhook (what ``systemctl reload cryptopi`` runs)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from appliance.helpers.cli import HelpFormatter, settings_help
from webhook.settings import WebhookSettings

TOKEN_VARIABLE = "CRYPTOPI_WEBHOOK_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m webhook", description=__doc__, formatter_class=HelpFormatter,
        epilog=settings_help(WebhookSettings),
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve the hook and run deploys (the default; CRYPTOPI_WEBHOOK_* settings)")
    p = sub.add_parser("init", help="generate a token (32 random bytes) and print the URL for Docker Hub")
    p.add_argument("--env-file", type=Path, help="append the token to this file (0600) if it has none")
    p.add_argument("--repository", default="cryptopi/appliance", help="Docker Hub repository to deploy from")
    p.add_argument("--public-url", default=os.environ.get("CRYPTOPI_WEBHOOK_PUBLIC_URL", "https://hooks.example.com"),
                   help="where the tunnel publishes the receiver")  # fmt: skip
    p = sub.add_parser("deploy", help="deploy the tag now, through the running webhook's health gate; waits "
                                      "for the outcome (exit 0: succeeded or unchanged)")  # fmt: skip
    p.add_argument("--now", action="store_true", help="even outside the deploy windows")
    p.add_argument(
        "--env-file", type=Path, help="CRYPTOPI_WEBHOOK_* settings file (e.g. /etc/cryptopi/webhook.env)"
    )
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds to wait for the outcome")
    return parser


def init(env_file: Path | None, public_url: str, repository: str = "cryptopi/appliance") -> int:
    token = secrets.token_urlsafe(32)
    if env_file is not None:
        existing = env_file.read_text() if env_file.exists() else ""
        if f"{TOKEN_VARIABLE}=" in existing:
            print(f"{env_file} already has a token: left as it is", file=sys.stderr)
            return 1
        env_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f"{TOKEN_VARIABLE}={token}\n")
            if "CRYPTOPI_WEBHOOK_REPOSITORY=" not in existing:
                f.write(f"CRYPTOPI_WEBHOOK_REPOSITORY={repository}\n")
            if "CRYPTOPI_WEBHOOK_MQTT_URL=" not in existing:  # the stack's own broker
                f.write("CRYPTOPI_WEBHOOK_MQTT_URL=mqtt://127.0.0.1:1883\n")
        print(f"token written to {env_file}")
    else:
        print(f"{TOKEN_VARIABLE}={token}")
    print(f"Docker Hub → repository → Webhooks → URL:\n  {public_url.rstrip('/')}/hooks/dockerhub/{token}")
    return 0


def listen(host: str, port: int) -> socket.socket:
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setblocking(False)
    return sock


async def serve() -> None:
    import uvicorn

    from appliance.logs import setup_logging
    from webhook.app import by_listener, create_admin_app, create_hook_app
    from webhook.clock import DeployWindow, SystemClock
    from webhook.deployer import Deployer
    from webhook.engine import DeployError, Engine, familiar, reference_repository
    from webhook.metrics import CLOCK_SYNCED
    from webhook.notify import AppriseNotifier, MqttNotifier
    from webhook.poller import poll_forever
    from webhook.records import Deployment, Records
    from webhook.settings import load_settings

    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("webhook")
    clock = SystemClock()
    if not clock.synchronized():  # the unit starts after time-sync.target; without an NTP client it cannot
        log.warning("system clock not synchronized: pushes are not refused for their age until it is")
    CLOCK_SYNCED.set(clock.synchronized())
    records = Records(settings.state_dir / "deployments.sqlite3", clock.time)
    engine = Engine(settings)
    listeners: list[Callable[[Deployment], None]] = []
    mqtt = MqttNotifier(settings.mqtt_url, settings.mqtt_device_id, settings.mqtt_discovery_prefix) \
        if settings.mqtt_url else None  # fmt: skip
    if mqtt:
        listeners.append(mqtt)
    if settings.notify_urls:
        listeners.append(AppriseNotifier(settings.notify_urls.get_secret_value()))
    window = DeployWindow(settings.quiet, settings.maintenance, settings.timezone)
    deployer = Deployer(engine, records, settings.health_timeout_s, window=window, clock=clock,
                        keep_images=settings.keep_images, listeners=listeners)  # fmt: skip
    installed = None
    try:  # a repository that is not the one compose runs would make every push "ignored"
        image = engine.image_reference()
        if not familiar(reference_repository(image)).endswith(settings.repository):
            log.warning("CRYPTOPI_WEBHOOK_REPOSITORY is not the image compose runs",
                        extra={"repository": settings.repository, "image": image})  # fmt: skip
        running = engine.running(reference_repository(image))
        installed = running.version if running else None
    except (DeployError, OSError) as exc:
        log.warning("compose config unreadable at start", extra={"error": str(exc)})
    deployer.adopt_running()
    if mqtt:
        mqtt.start(installed)
    sockets = [listen(settings.host, settings.port), listen(settings.admin_host, settings.admin_port)]
    hook_port, admin_port = (int(s.getsockname()[1]) for s in sockets)
    app = by_listener({hook_port: create_hook_app(settings, records, deployer, clock),
                       admin_port: create_admin_app(settings, records, deployer)})  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    log.info("listening", extra={"hook": f"{settings.host}:{hook_port}",
                                 "local": f"{settings.admin_host}:{admin_port}", "poll_s": settings.poll_s,
                                 "quiet": settings.quiet_minutes,
                                 "maintenance": settings.maintenance_window or "any time"})  # fmt: skip
    if records.interrupted:  # the last run stopped mid-deploy: make sure the newest good image runs
        deployer.request("(recovery)", clock.time(), "recovery")
    tasks = [asyncio.create_task(deployer.run())]
    if settings.poll_s > 0:
        tasks.append(asyncio.create_task(poll_forever(engine, deployer, records, clock, settings.poll_s)))
    try:
        await server.serve(sockets)  # until SIGTERM / SIGINT
    finally:
        await deployer.drain()  # never stop half-way through a recreate (the unit allows 20 min)
        for task in tasks:
            task.cancel()
        if mqtt:
            mqtt.stop()
        records.close()


ENDED_OK = ("succeeded", "unchanged")


def deploy(env_file: Path | None, now: bool, timeout_s: float) -> int:
    """Ask the running webhook for a deploy and follow it to its end, printing each state."""
    from webhook.records import ENDED
    from webhook.settings import load_settings

    settings = load_settings(**({"_env_file": env_file} if env_file else {}))
    host = "127.0.0.1" if settings.admin_host in ("0.0.0.0", "::") else settings.admin_host
    base = f"http://{host}:{settings.admin_port}"
    auth = {"Authorization": f"Bearer {settings.token.get_secret_value()}"}
    try:
        with httpx.Client(base_url=base, headers=auth, timeout=10) as client:
            asked = client.post("/deploy", params={"now": now})
            asked.raise_for_status()
            number, joined = asked.json()["deployment"], asked.json()["coalesced"]
            print(f"deployment {number} queued{' (joined one already waiting)' if joined else ''}")
            deadline, seen = time.monotonic() + timeout_s, ""
            while time.monotonic() < deadline:
                d = client.get(f"/deployments/{number}").json()
                if d["state"] != seen:
                    seen = d["state"]
                    until = f" until {time.strftime('%H:%M:%S', time.localtime(d['deferred_until']))}" \
                        if seen == "deferred" and d.get("deferred_until") else ""  # fmt: skip
                    print(f"  {seen}{until}", flush=True)
                if seen in ENDED:
                    if d.get("error"):
                        print(f"  {d['error']}")
                    return 0 if seen in ENDED_OK else 1
                time.sleep(1)
    except httpx.HTTPError as exc:
        print(f"the webhook at {base} did not answer ({exc}): is cryptopi-webhook running?", file=sys.stderr)
        return 3
    print(f"deployment {number} had not ended after {timeout_s:.0f} s (it goes on)", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "init":
        return init(args.env_file, args.public_url, args.repository)
    if args.command == "deploy":
        return deploy(args.env_file, args.now, args.timeout)
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
