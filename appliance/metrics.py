"""Every Prometheus metric of the appliance, defined here only (one registry per process, at /metrics)."""

from prometheus_client import Counter, Gauge, Histogram

FEED_MESSAGES = Counter("cryptopi_feed_messages_total", "WebSocket feed messages accepted, by type", ["type"])
FEED_REJECTED = Counter(
    "cryptopi_feed_rejected_total",
    "Feed frames or trades skipped, by reason (malformed, unknown_type, unknown_product, duplicate, ...)",
    ["reason"],
)
FEED_CONNECTS = Counter("cryptopi_feed_connects_total", "WebSocket connections opened (first + reconnects)")
FEED_DISCONNECTS = Counter(
    "cryptopi_feed_disconnects_total", "WebSocket feed losses, by cause (closed, silent, error)", ["cause"]
)
FEED_CONNECTED = Gauge("cryptopi_feed_connected", "1 while the WebSocket feed is connected")
TRADES_INGESTED = Counter(
    "cryptopi_trades_ingested_total", "Trades committed to candles, by product and path", ["product", "via"]
)
GAPS_REPAIRED = Counter(
    "cryptopi_gaps_repaired_total", "Trade-id gaps filled over REST, by product", ["product"]
)
TRADES_UNRECOVERABLE = Counter(
    "cryptopi_trades_unrecoverable_total",
    "Trade ids inside a repaired gap that REST did not return either",
    ["product"],
)
REST_REQUESTS = Counter(
    "cryptopi_rest_requests_total", "Coinbase REST requests, by endpoint and outcome", ["endpoint", "outcome"]
)
REST_ROWS_REJECTED = Counter(
    "cryptopi_rest_rows_rejected_total", "Malformed rows in Coinbase REST answers, skipped", ["endpoint"]
)
STORE_COMMITS = Counter(
    "cryptopi_store_commits_total", "Trade commits (SQLite transactions) by ingest: what the SD card writes"
)
LAST_TRADE_TIME = Gauge(
    "cryptopi_last_trade_timestamp_seconds", "Event time of the newest committed trade", ["product"]
)
MODEL_INFO = Gauge("cryptopi_model_info", "Model versions serving (value 1)", ["product", "model", "version"])
MODEL_REFUSED = Counter("cryptopi_model_refused_total", "Registry versions refused, by product", ["product"])
REALIZED_MAE = Gauge(
    "cryptopi_realized_mae", "Rolling MAE of realized predictions, by product, horizon (s) and model",
    ["product", "granularity", "model"],
)  # fmt: skip
COVERAGE_80 = Gauge("cryptopi_realized_coverage_80", "Share of realized closes inside the 80% interval",
                    ["product", "granularity", "model"])  # fmt: skip
MQTT_CONNECTED = Gauge("cryptopi_mqtt_connected", "1 while connected to the MQTT broker")
MQTT_PUBLISHED = Counter(
    "cryptopi_mqtt_published_total",
    "MQTT messages handed to a connected broker, by kind (prediction, live_price, feed, discovery)",
    ["kind"],
)
HTTP_LATENCY = Histogram(
    "cryptopi_http_request_seconds", "HTTP request latency by route", ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)  # fmt: skip
HTTP_REFUSED = Counter(
    "cryptopi_http_refused_total",
    "Requests and connections the HTTP edge refused, by reason (rate_limited, local_only, too_many_streams, "
    "too_many_connections, idle_evicted, headers_too_large, too_many_headers, header_timeout)",
    ["reason"],
)
