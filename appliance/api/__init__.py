"""The appliance's HTTP API (FastAPI; OpenAPI at /docs)."""
