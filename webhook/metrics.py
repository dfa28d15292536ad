"""Every Prometheus metric of the webhook, defined here only (served at its /metrics)."""

from prometheus_client import Counter, Gauge, Histogram

HOOK_REQUESTS = Counter("cryptopi_webhook_requests_total", "Hook requests by outcome", ["outcome"])
for _outcome in ("wrong_token", "too_large", "bad_payload", "ignored", "accepted"):
    HOOK_REQUESTS.labels(_outcome)
LOCAL_ONLY_REFUSED = Counter("cryptopi_webhook_local_only_refused_total",
                             "Requests to the local-only listener that came through the tunnel")  # fmt: skip
DEPLOYS = Counter("cryptopi_webhook_deployments_total", "Deployments by how they ended", ["state"])
DEPLOY_SECONDS = Histogram("cryptopi_webhook_deploy_seconds", "Time from start to end of a deployment",
                           buckets=(5, 10, 20, 30, 60, 120, 300, 600))  # fmt: skip
DEFERRED = Counter("cryptopi_webhook_deferred_total", "Deploys held back by a deploy window")
POLLS = Counter("cryptopi_webhook_polls_total", "Registry polls by outcome", ["outcome"])
for _outcome in ("unchanged", "changed", "failed_before", "busy", "error", "rate_limited"):
    POLLS.labels(_outcome)
PRUNED_BYTES = Counter("cryptopi_webhook_pruned_bytes_total", "Bytes of image layers removed by pruning")
NOTIFICATIONS = Counter("cryptopi_webhook_notifications_total", "Apprise notifications", ["outcome"])
CLOCK_SYNCED = Gauge("cryptopi_webhook_clock_synchronized", "1 once NTP has set the system clock")
