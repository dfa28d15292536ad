"""Every Prometheus metric of the webhook, defined here only (served at its /metrics)."""

from prometheus_client import Counter, Histogram

HOOK_REQUESTS = Counter("cryptopi_webhook_requests_total", "Hook requests by outcome", ["outcome"])
for _outcome in ("wrong_token", "too_large", "bad_payload", "ignored", "accepted"):
    HOOK_REQUESTS.labels(_outcome)
DEPLOYS = Counter("cryptopi_webhook_deployments_total", "Deployments by how they ended", ["state"])
DEPLOY_SECONDS = Histogram("cryptopi_webhook_deploy_seconds", "Time from start to end of a deployment",
                           buckets=(5, 10, 20, 30, 60, 120, 300, 600))  # fmt: skip
