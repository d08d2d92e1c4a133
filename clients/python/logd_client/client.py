"""LogdClient: a WriteLogBidi stream with acks, client seqs and retries.

Exactly once across reconnects: every frame carries a client seq (the
session's last seq, asked from the server with GetSession at start, + 1, + 2,
...). Frames are kept until an ack covers them; after a broken stream they
are resent in order on a new stream, and the server drops the ones it already
holds as duplicates. So a frame is never lost (it stays buffered until acked)
and never written twice (the seq decides).

Where the next seq lives across a restart of *this* process: on the server.
A new LogdClient asks GetSession for the session's last seq and continues
after it; frames buffered but unacked in a process that died are gone with
it, as with any in-memory buffer (use flush() at the points that matter).
Two processes must not write the same session with client seqs at once.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from typing import Any, Deque, Dict, Iterator, Optional, Tuple

import grpc
from google.protobuf import struct_pb2, timestamp_pb2

from ._proto.logging.v1 import logging_pb2 as pb
from ._proto.logging.v1 import logging_pb2_grpc as pb_grpc

log = logging.getLogger("logd_client")
# Our own records must never loop back into a LogdHandler.
log.propagate = False

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


class LogdError(Exception):
    """A frame was rejected, the buffer is full (block=False), or the client is closed."""


def _retry_delay(err: grpc.RpcError) -> Optional[float]:
    """The RetryInfo delay the server attached to a status, if any."""
    try:
        from google.rpc import error_details_pb2, status_pb2
    except ImportError:  # googleapis-common-protos missing: back off blindly
        return None
    for key, value in (err.trailing_metadata() or ()):
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


class LogdClient:
    """Sends frames of one session to logd over a bidi stream.

    `send()` returns once the frame is queued (it blocks only while the
    buffer of `buffer_max` unacked frames is full, or raises LogdError if
    `block=False`); `flush(timeout)` returns True when everything sent so far
    is durable on the server.
    """

    def __init__(self, target: str, session_id: str, *, role: str = "", user_id: str = "",
                 buffer_max: int = 100_000, block: bool = True, token: Optional[str] = None,
                 credentials: Optional[grpc.ChannelCredentials] = None, batch_max: int = 512,
                 backoff_max: float = 5.0) -> None:
        self.target = target
        self.session_id = session_id
        self.role = role
        self.user_id = user_id
        self.buffer_max = buffer_max
        self.block = block
        self.batch_max = batch_max
        self.backoff_max = backoff_max
        self._metadata = [("x-session-id", session_id)]
        if token:
            self._metadata.append(("authorization", f"Bearer {token}"))
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self._channel = (grpc.secure_channel(target, credentials, options) if credentials
                         else grpc.insecure_channel(target, options))
        self._stub = pb_grpc.LogServiceStub(self._channel)
        self._lock = threading.Condition()
        # Unacked frames in seq order: (seq, frame). The stream sends them in
        # this order; acks pop from the front.
        self._unacked: Deque[Tuple[int, pb.LogFrame]] = collections.deque()
        self._unsent = 0          # how many of the newest _unacked are not on the current stream
        self._next_seq: Optional[int] = None
        self._closed = False
        self._rejections: list = []
        self.acked_through = 0    # highest seq acknowledged
        self._thread = threading.Thread(target=self._run, name=f"logd-{session_id}", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------

    def send(self, content: str, *, role: Optional[str] = None, user_id: Optional[str] = None,
             metadata: Optional[Dict[str, Any]] = None, time_ns: Optional[int] = None) -> int:
        """Queues one frame and returns its seq."""
        frame = pb.LogFrame(session_id=self.session_id, content=content,
                            role=self.role if role is None else role,
                            user_id=self.user_id if user_id is None else user_id)
        if metadata:
            s = struct_pb2.Struct()
            s.update(metadata)
            frame.metadata.CopyFrom(s)
        ts = timestamp_pb2.Timestamp()
        if time_ns is None:
            ts.GetCurrentTime()
        else:
            ts.FromNanoseconds(time_ns)
        frame.time.CopyFrom(ts)
        with self._lock:
            while len(self._unacked) >= self.buffer_max and not self._closed:
                if not self.block:
                    raise LogdError(f"buffer full: {len(self._unacked)} frames not yet acknowledged")
                self._lock.wait(0.5)
            if self._closed:
                raise LogdError("client is closed")
            while self._next_seq is None and not self._closed:
                self._lock.wait(0.1)  # the sender thread is asking the server for the last seq
            seq = self._next_seq
            self._next_seq += 1
            frame.seq = seq
            self._unacked.append((seq, frame))
            self._unsent += 1
            self._lock.notify_all()
            return seq

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Waits until every frame sent so far is acknowledged (durable)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = (self._next_seq or 1) - 1
            while self.acked_through < target and self._unacked:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(0.1 if left is None else min(left, 0.1))
            return True

    def pending(self) -> int:
        """Frames not yet acknowledged."""
        with self._lock:
            return len(self._unacked)

    def rejections(self) -> list:
        """(seq, reason) of frames the server rejected as invalid."""
        with self._lock:
            return list(self._rejections)

    def close(self, timeout: Optional[float] = 10.0) -> bool:
        """Flushes (up to `timeout`), then stops the stream. True if all was acked."""
        done = self.flush(timeout)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=5)
        self._channel.close()
        return done

    def __enter__(self) -> "LogdClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the sender thread --------------------------------------------------

    def _resume_seq(self) -> None:
        info = self._stub.GetSession(pb.SessionRequest(session_id=self.session_id), metadata=self._metadata,
                                     timeout=10)
        with self._lock:
            if self._next_seq is None:
                self._next_seq = info.last_seq + 1
                self._lock.notify_all()

    def _requests(self, stream_frames: list) -> Iterator[pb.LogFrame]:
        """Yields every unacked frame once, then new ones as they come."""
        while True:
            with self._lock:
                while self._unsent == 0 and not self._closed:
                    self._lock.wait(0.2)
                if self._closed and self._unsent == 0:
                    return
                start = len(self._unacked) - self._unsent
                batch = [f for _, f in list(self._unacked)[start:start + self.batch_max]]
                self._unsent -= len(batch)
            for frame in batch:
                stream_frames.append(frame.seq)
                yield frame

    def _run(self) -> None:
        backoff = 0.1
        while True:
            with self._lock:
                if self._closed:
                    return
            try:
                if self._next_seq is None:
                    self._resume_seq()
                self._stream_once()
                backoff = 0.1
            except grpc.RpcError as err:
                code = err.code()
                delay = _retry_delay(err)
                if code not in RETRYABLE:
                    log.error("logd stream failed with %s: %s; retrying in %.1fs", code, err.details(), backoff)
                wait = delay if delay is not None else backoff * (0.5 + random.random())
                with self._lock:
                    self._unsent = len(self._unacked)  # resend everything unacked on the next stream
                    if not self._closed:
                        self._lock.wait(wait)
                backoff = min(backoff * 2, self.backoff_max)

    def _stream_once(self) -> None:
        with self._lock:
            self._unsent = len(self._unacked)
        sent_seqs: list = []  # seq of each frame of this stream, by stream index
        acks = self._stub.WriteLogBidi(self._requests(sent_seqs), metadata=self._metadata)
        settled = 0
        for ack in acks:
            with self._lock:
                for r in ack.rejections:
                    self._rejections.append((sent_seqs[r.index], r.reason))
                    log.error("logd rejected frame seq %d: %s", sent_seqs[r.index], r.reason)
                while settled < ack.through_index:
                    seq = sent_seqs[settled]
                    while self._unacked and self._unacked[0][0] <= seq:
                        self._unacked.popleft()
                    self.acked_through = max(self.acked_through, seq)
                    settled += 1
                self._lock.notify_all()
        with self._lock:
            if self._unacked and not self._closed:
                raise _StreamEnded()


class _StreamEnded(grpc.RpcError):
    """The server ended the stream with frames unacked: reconnect and resend."""

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "stream ended with frames unacknowledged"

    def trailing_metadata(self):
        return ()
