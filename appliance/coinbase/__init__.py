"""Coinbase Exchange protocol: wire messages, REST and WebSocket clients, and the offline replay server."""
