"""LogdHandler: ships standard ``logging`` records to logd without ever
blocking the application.

``emit()`` formats the record and puts it in the client's bounded in-memory
queue (``queue_max`` frames); the client's background thread streams the
queue to logd and retries until each frame is durable. ``emit()`` does no
network I/O and takes no lock a network call holds, so it returns in
microseconds whatever the server does.

When the queue is full (the server down or slower than the application):

- ``on_full="drop"`` (default): the new record is dropped and counted in
  ``handler.dropped``; the first drop of each episode is reported on stderr
  through ``logging.lastResort`` (never through this handler).
- ``on_full="block"``: ``emit()`` waits up to ``block_timeout`` seconds for
  room, then drops and counts as above.

Errors: a non-retryable failure (bad token, a frame the server rejected, ...)
is reported once through ``handleError``; records logged after the client
stopped are counted in ``dropped``.

Exit: ``logging.shutdown()`` (run at interpreter exit) flushes and closes the
handler; with the server down it returns after ``close_timeout`` seconds, and
the records still queued then are lost with the process (counted in
``handler.unsent`` after close).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import Any, Dict, Optional

from .client import BufferFull, LogdClient, LogdError, to_value

# Attributes every LogRecord has; anything else came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None))) | {
    "message", "asctime", "taskName"}

# Set at interpreter exit before logging.shutdown() runs (atexit is LIFO and
# logging registered its hook when it was imported, before this module): the
# flush() that logging.shutdown() makes before close() then does not wait, so
# exit takes at most close_timeout.
_exiting = threading.Event()
atexit.register(_exiting.set)


class LogdHandler(logging.Handler):
    """A ``logging.Handler`` that sends each record as one frame.

    The frame's content is the formatted message, its role the level name,
    and its metadata the level, logger name, module, line, thread, the
    exception text (if any) and every ``extra=`` field (values converted as
    in :func:`logd_client.client.to_value`).
    """

    def __init__(self, target: str, session_id: str, *, level: int = logging.NOTSET,
                 client: Optional[LogdClient] = None, queue_max: int = 100_000, on_full: str = "drop",
                 block_timeout: float = 0.1, flush_timeout: float = 10.0, close_timeout: float = 5.0,
                 **client_args: Any) -> None:
        super().__init__(level)
        if on_full not in ("drop", "block"):
            raise ValueError(f"on_full must be 'drop' or 'block', not {on_full!r}")
        self.client = client or LogdClient(target, session_id, buffer_max=queue_max, block=False, **client_args)
        self.on_full = on_full
        self.block_timeout = block_timeout
        self.flush_timeout = flush_timeout
        self.close_timeout = close_timeout
        self.dropped = 0          # records not queued (queue full, or the client stopped)
        self.unsent = 0           # records still queued when close() returned
        self._dropping = False    # inside a drop episode (reported once)
        self._reported: Optional[LogdError] = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record) if self.formatter else record.getMessage()
            metadata: Dict[str, Any] = {
                "level": record.levelname,
                "logger": record.name,
                "module": record.module,
                "line": record.lineno,
                "thread": record.threadName or "",
            }
            if record.exc_info:
                metadata["exc_text"] = logging.Formatter().formatException(record.exc_info)
            for key, value in record.__dict__.items():
                if key not in _STANDARD and key not in metadata:
                    metadata[key] = value
            block = self.on_full == "block"
            self.client.send(message, role=record.levelname, metadata=metadata,
                             time_ns=int(record.created * 1e9), block=block,
                             timeout=self.block_timeout if block else None)
            self._dropping = False
        except BufferFull:
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                self._last_resort(f"LogdHandler: queue full ({self.client.buffer_max} records wait for logd at "
                                  f"{self.client.target}); dropping records (count in handler.dropped)")
        except LogdError:
            self.dropped += 1
            if self.client.error is not None and self._reported is self.client.error:
                return  # the client stopped: reported once already
            self._reported = self.client.error
            self.handleError(record)
        except Exception:  # never let logging raise into the application
            self.handleError(record)

    @staticmethod
    def _last_resort(msg: str) -> None:
        rec = logging.makeLogRecord({"name": "logd_client", "levelno": logging.WARNING,
                                     "levelname": "WARNING", "msg": msg})
        (logging.lastResort or logging.StreamHandler()).handle(rec)

    def flush(self) -> None:
        """Waits up to ``flush_timeout`` for queued records to be durable
        (``handler.client.flush(t)`` says whether they were)."""
        if _exiting.is_set():
            return  # close() right after this waits, with close_timeout
        try:
            self.client.flush(self.flush_timeout)
        except LogdError:
            pass  # reported by emit() through handleError

    def close(self) -> None:
        """Flushes for at most ``close_timeout`` seconds, then stops."""
        try:
            start = time.monotonic()
            self.client.close(self.close_timeout)
            self.unsent = self.client.pending()
            if self.unsent:
                self._last_resort(f"LogdHandler: {self.unsent} records not acknowledged by logd at "
                                  f"{self.client.target} after {time.monotonic() - start:.1f} s; they are lost")
        finally:
            super().close()
