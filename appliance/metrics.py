"""Prometheus metrics of the appliance (one registry per process, served at /metrics)."""

from prometheus_client import Counter, Gauge

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
LAST_TRADE_TIME = Gauge(
    "cryptopi_last_trade_timestamp_seconds", "Event time of the newest committed trade", ["product"]
)
