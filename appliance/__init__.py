"""cryptopi appliance: Coinbase ingest, features, ONNX inference, HTTP API and MQTT."""

__version__ = "0.1.0"
