"""``python -m webhook``: serve the Docker Hub hook (what the systemd unit runs); ``init``: make a token."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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


async def serve() -> None:
    import uvicorn

    from appliance.logs import setup_logging
    from webhook.app import create_app
    from webhook.deployer import Deployer, mqtt_notifier
    from webhook.engine import DeployError, Engine, split_reference
    from webhook.records import Records
    from webhook.settings import load_settings

    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("webhook")
    records = Records(settings.state_dir / "deployments.sqlite3")
    engine = Engine(settings)
    deployer = Deployer(engine, records, settings.health_timeout_s)
    if settings.mqtt_url:
        deployer.notify = mqtt_notifier(settings.mqtt_url, settings.mqtt_device_id)
    try:  # a repository that is not the one compose runs would make every push "ignored"
        image = engine.image_reference()
        if not split_reference(image)[0].endswith(settings.repository):
            log.warning("CRYPTOPI_WEBHOOK_REPOSITORY is not the image compose runs",
                        extra={"repository": settings.repository, "image": image})  # fmt: skip
    except DeployError as exc:
        log.warning("compose config unreadable at start", extra={"error": str(exc)})
    app = create_app(settings, records, deployer)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                                           access_log=False, lifespan="off"))  # fmt: skip
    if records.interrupted:  # the last run stopped mid-deploy: make sure the newest good image runs
        deployer.request("(recovery)", time.time())
    worker = asyncio.create_task(deployer.run())
    try:
        await server.serve()  # until SIGTERM / SIGINT
    finally:
        await deployer.drain()  # never stop half-way through a recreate (the unit allows 20 min)
        worker.cancel()
        records.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "init":
        return init(args.env_file, args.public_url, args.repository)
    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
