"""Coinbase Exchange protocol as the appliance speaks it in production: wire messages, REST, the feed."""
