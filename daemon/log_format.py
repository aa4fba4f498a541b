"""How the daemon's log records are written: one human line each (`text`), or one JSON object
per line (`json`, DINFER_LOG_FORMAT) for a log shipper.

A JSON line holds the record's time (UTC, ISO 8601), level, logger and message, the exception
when there is one, and a record's `request` extra (the per-request summary the usage ledger
logs) as it was given. Nothing else of a record is copied: a log line must never carry request
content, keys or tokens, and only what is named here is written.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any, Final

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request = getattr(record, "request", None)
        if isinstance(request, dict):
            line["request"] = request
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    """The root logger's one handler on stderr, in `log_format` (`text` or `json`)."""
    handler = logging.StreamHandler()
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # coredis logs each of its connection retries at INFO: with a cluster's Redis down that
    # is thousands of lines a minute per instance, while dinfer.cluster already says, once,
    # that Redis is unreachable and when it is back. Its warnings and errors still show.
    coredis_level = max(logging.getLevelName(level.upper()), logging.WARNING)
    logging.getLogger("coredis").setLevel(coredis_level)
