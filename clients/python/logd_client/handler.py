"""LogdHandler: ships standard `logging` records to logd without blocking
the caller on the network (records are queued; a background thread streams
them and retries until each is durable)."""

from __future__ import annotations

import logging
from typing import Optional

from .client import LogdClient


class LogdHandler(logging.Handler):
    """A `logging.Handler` that sends each record as one frame.

    The frame's content is the formatted message, its role the level name,
    and its metadata the level, logger name, module, line, thread and the
    exception text (if any).
    """

    def __init__(self, target: str, session_id: str, *, level: int = logging.NOTSET,
                 client: Optional[LogdClient] = None, flush_timeout: float = 10.0, **client_args) -> None:
        super().__init__(level)
        self.client = client or LogdClient(target, session_id, **client_args)
        self.flush_timeout = flush_timeout

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record) if self.formatter else record.getMessage()
            metadata = {
                "level": record.levelname,
                "logger": record.name,
                "module": record.module,
                "line": record.lineno,
                "thread": record.threadName or "",
            }
            if record.exc_info:
                metadata["exc_text"] = logging.Formatter().formatException(record.exc_info)
            self.client.send(message, role=record.levelname, metadata=metadata,
                             time_ns=int(record.created * 1e9))
        except Exception:  # never let logging raise into the application
            self.handleError(record)

    def flush(self) -> None:
        self.client.flush(self.flush_timeout)

    def close(self) -> None:
        try:
            self.client.close(self.flush_timeout)
        finally:
            super().close()
