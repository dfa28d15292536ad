"""cryptopi appliance: Coinbase ingest, features, ONNX inference, HTTP API and MQTT."""

import os

__version__ = "0.1.0"

# onnxruntime's Linux wheels report usage to Microsoft and keep a device id unless told not to:
# an appliance on someone's shelf phones no one. Set before anything here imports onnxruntime.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
