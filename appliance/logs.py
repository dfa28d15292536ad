"""Structured logs: ``logfmt`` for people at 3 a.m., JSON lines for machines; ``extra=`` fields included."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

#: Record attributes that are not ``extra=`` fields; uvicorn's ``color_message`` is its message again,
#: with ANSI colour codes, and has no place in a log file.
_RECORD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))
_NOT_FIELDS = _RECORD | {"message", "asctime", "taskName", "color_message"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _NOT_FIELDS}


def _ts(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _logfmt_value(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\\') or _CONTROL.search(text):  # a newline or ESC stays escaped
        return json.dumps(text)
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"ts={_ts(record)}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_logfmt_value(record.getMessage())}",
        ]
        parts += [f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items()]
        if record.exc_info:
            parts.append(f"exc={_logfmt_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": _ts(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: str = "INFO", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "websockets"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class ThrottledLog:
    """At most one line per key and interval, saying how many were suppressed: floods stay readable."""

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0) -> None:
        self._log, self._interval = logger, interval_s
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, msg: str, **fields: object) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-1e9, 0))
        if now - last < self._interval:
            self._last[key] = (last, suppressed + 1)
            return
        self._last[key] = (now, 0)
        self._log.warning(msg, extra={**fields, "suppressed": suppressed} if suppressed else fields)
