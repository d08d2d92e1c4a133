"""Crash-safe logging to logd.

    from logd_client import LogdClient, LogdHandler

    client = LogdClient("127.0.0.1:50051", "my-session")
    client.send("hello", role="agent")
    client.flush(timeout=10)          # True once everything sent is durable

    logging.getLogger().addHandler(LogdHandler("127.0.0.1:50051", "my-session"))
"""

from .client import LogdClient, LogdError
from .handler import LogdHandler

__all__ = ["LogdClient", "LogdError", "LogdHandler"]
