"""LogdClient: a WriteLogBidi stream with acks, client seqs and retries.

Exactly once across reconnects
------------------------------
Every frame carries a client seq. Frames wait in one FIFO (``_frames``) until
an ack settles them; each frame has a *position* (0, 1, 2, ... in the order
``send()`` queued it), and ``_settled`` is the position of the oldest frame
not yet settled.

Each stream starts at ``_settled`` and sends positions ``start, start+1, ...``
in order. An ack's ``through_index = n`` says the first ``n`` messages *of
that stream* are settled, so positions ``[start, start + n)`` are. Nothing
else ever settles a frame: a frame is never counted as sent on a dead stream
(a new stream always resends from the oldest unsettled frame, and the server
drops the ones it already holds as duplicates of their seq), and an ack on
one stream never settles a frame that stream did not send.

The seq base is the session's last seq on the server (``GetSession``). It is
asked when the first stream is set up, not in ``send()``: frames queued
before then get their seqs (base + 1, + 2, ... in queue order) at that
moment. So ``send()`` never waits for the network; it returns the seq when
it is already known, else None.

Where the next seq lives across a restart of *this* process: on the server.
Frames buffered but unacked in a process that died are gone with it, as with
any in-memory buffer (use ``flush()`` at the points that matter). Two
processes must not write the same session at once.

Errors
------
Retryable failures (the server down or restarting, overload with
``RetryInfo``, a broken stream) are retried with backoff, forever, and
logged once per outage as a warning (with how many frames wait). A
non-retryable status (``INVALID_ARGUMENT``, ``UNAUTHENTICATED``,
``PERMISSION_DENIED``, ``UNIMPLEMENTED``, ...) stops the client: every later
``send()``/``flush()`` raises :class:`LogdError` with the server's message.
Frames the server rejected (invalid, too large) are settled, not retried,
and the next ``send()``/``flush()`` raises :class:`LogdError` once for them.
"""

from __future__ import annotations

import collections
import datetime
import logging
import random
import re
import threading
import time
from typing import Any, Deque, Dict, Iterator, List, Optional, Tuple

import grpc
from google.protobuf import struct_pb2, timestamp_pb2

from ._proto.logging.v1 import logging_pb2 as pb
from ._proto.logging.v1 import logging_pb2_grpc as pb_grpc

log = logging.getLogger("logd_client")
# Our own records must never loop back into a LogdHandler; with no handler of
# its own, warnings reach stderr through logging.lastResort.
log.propagate = False

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
                       grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})

# The server's rule for session ids (README, "The contract").
SESSION_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")

# logd's default LOGD_MAX_MESSAGE_BYTES: a larger message ends the stream
# with OUT_OF_RANGE, so send() refuses such a frame up front.
MAX_MESSAGE_BYTES = 4_259_840

# google.protobuf.Struct numbers are doubles: integers beyond this lose
# precision, so they are sent as strings.
EXACT_INT_MAX = 2 ** 53


class LogdError(Exception):
    """The server refused frames or the call (non-retryable), the buffer is
    full, a frame is too large, or the client is closed."""


class BufferFull(LogdError):
    """``send()`` found ``buffer_max`` frames waiting (and did not block, or
    its ``timeout`` ran out). The frame was not queued."""


def parse_target(target: str) -> Tuple[str, Optional[bool]]:
    """Splits ``host:port``, ``http://host:port`` or ``https://host:port``
    into the gRPC target and whether TLS is asked for (None: not said)."""
    tls: Optional[bool] = None
    rest = target.strip()
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", rest)
    if m and m.group(1).lower() in ("http", "https"):
        tls = m.group(1).lower() == "https"
        rest = m.group(2).rstrip("/")
        if "/" in rest:
            raise ValueError(f"invalid target {target!r}: no path allowed after host:port")
    elif m:
        raise ValueError(f"invalid target {target!r}: expected host:port, http://host:port or https://host:port")
    if not rest or any(c.isspace() for c in rest):
        raise ValueError(f"invalid target {target!r}: expected host:port, http://host:port or https://host:port")
    return rest, tls


def make_channel(target: str, credentials: Optional[grpc.ChannelCredentials] = None,
                 options: Optional[list] = None) -> grpc.Channel:
    """A channel for any accepted target form. ``https://`` means TLS with
    the system roots unless ``credentials`` are given; ``credentials`` also
    turn on TLS for a ``host:port`` target."""
    address, tls = parse_target(target)
    if tls is False and credentials is not None:
        raise ValueError(f"target {target!r} is plaintext (http://) but credentials were given")
    if tls or credentials is not None:
        return grpc.secure_channel(address, credentials or grpc.ssl_channel_credentials(), options)
    return grpc.insecure_channel(address, options)


def to_value(v: Any, depth: int = 0) -> Any:
    """``v`` as something ``google.protobuf.Struct`` holds without loss or
    error: integers beyond 2**53 as strings, datetimes as ISO 8601, bytes as
    UTF-8 (undecodable bytes escaped), mappings and sequences recursively,
    anything else as ``str(v)``."""
    if v is None or isinstance(v, (bool, str, float)):
        return v
    if isinstance(v, int):
        return v if -EXACT_INT_MAX < v < EXACT_INT_MAX else str(v)
    if depth >= 32:  # the server refuses deeper structs; keep the text
        return str(v)
    if isinstance(v, dict):
        return {str(k): to_value(x, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [to_value(x, depth + 1) for x in v]
    if isinstance(v, (datetime.datetime, datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", "backslashreplace")
    return str(v)


def _retry_delay(err: grpc.RpcError) -> Optional[float]:
    """The RetryInfo delay the server attached to a status, if any."""
    try:
        from google.rpc import error_details_pb2, status_pb2
    except ImportError:  # googleapis-common-protos missing: back off blindly
        return None
    try:
        trailers = err.trailing_metadata() or ()
    except Exception:  # not every RpcError carries trailers
        return None
    for key, value in trailers:
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


class _Stream:
    """One WriteLogBidi call: the queue position it started at, and how far
    its request iterator has read."""

    __slots__ = ("gen", "start", "cursor")

    def __init__(self, gen: int, start: int) -> None:
        self.gen = gen
        self.start = start
        self.cursor = start


class LogdClient:
    """Sends frames of one session to logd over a bidi stream.

    ``send()`` queues a frame and returns at once (its seq, or None while the
    seq base is not known yet); it waits only when ``buffer_max`` frames are
    unsettled and ``block`` is true (up to ``timeout``, then
    :class:`BufferFull`). ``flush(timeout)`` returns True when every frame
    queued before it is durable on the server, False when the timeout ran out
    first. ``close(timeout)`` flushes, stops the stream and returns within
    ``timeout``.
    """

    def __init__(self, target: str, session_id: str, *, role: str = "", user_id: str = "",
                 buffer_max: int = 100_000, block: bool = True, token: Optional[str] = None,
                 credentials: Optional[grpc.ChannelCredentials] = None, batch_max: int = 512,
                 backoff_max: float = 5.0, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        if not SESSION_ID.match(session_id):
            raise ValueError(f"invalid session_id {session_id!r}: must match {SESSION_ID.pattern}")
        if buffer_max < 1 or batch_max < 1:
            raise ValueError("buffer_max and batch_max must be at least 1")
        self.target = target
        self.session_id = session_id
        self.role = role
        self.user_id = user_id
        self.buffer_max = buffer_max
        self.block = block
        self.batch_max = batch_max
        self.backoff_max = backoff_max
        self.max_message_bytes = max_message_bytes
        self._metadata = [("x-session-id", session_id)]
        if token:
            self._metadata.append(("authorization", f"Bearer {token}"))
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self._channel = make_channel(target, credentials, options)
        self._stub = pb_grpc.LogServiceStub(self._channel)
        self._lock = threading.Condition()
        self._wake = threading.Event()          # set by close(): ends a backoff sleep at once
        self._frames: Deque[pb.LogFrame] = collections.deque()  # unsettled, in queue order
        self._settled = 0                       # position of _frames[0]
        self._queued = 0                        # position the next send() gets
        self._next_seq: Optional[int] = None    # None until GetSession answered
        self._stream: Optional[_Stream] = None  # the current stream
        self._gen = 0
        self._closed = False
        self._fatal: Optional[LogdError] = None   # a non-retryable status: the client stopped
        self._unreported: List[Tuple[int, str]] = []  # the first 3 rejections not yet raised
        self._unreported_count = 0
        self._rejections: List[Tuple[int, str]] = []  # every rejection (the first 10,000)
        self._outage_since: Optional[float] = None
        self.acked_through = 0                  # highest seq acknowledged
        self.reconnects = 0                     # streams set up after the first
        self.rejected = 0                       # frames the server rejected
        self._thread = threading.Thread(target=self._run, name=f"logd-{session_id}", daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------

    def send(self, content: str, *, role: Optional[str] = None, user_id: Optional[str] = None,
             metadata: Optional[Dict[str, Any]] = None, time_ns: Optional[int] = None,
             block: Optional[bool] = None, timeout: Optional[float] = None) -> Optional[int]:
        """Queues one frame. Returns its seq, or None if the session's seq
        base is not known yet (the frame gets its seq when the first stream
        is set up). Raises LogdError (and queues nothing) when the client has
        stopped, frames were rejected since the last call, the frame is
        larger than ``max_message_bytes``, or the buffer is full."""
        frame = pb.LogFrame(session_id=self.session_id, content=content,
                            role=self.role if role is None else role,
                            user_id=self.user_id if user_id is None else user_id)
        if metadata:
            frame.metadata.update(to_value(metadata))
        ts = timestamp_pb2.Timestamp()
        if time_ns is None:
            ts.GetCurrentTime()
        else:
            ts.FromNanoseconds(time_ns)
        frame.time.CopyFrom(ts)
        size = frame.ByteSize() + 11  # + the seq field and the message's own framing
        if size > self.max_message_bytes:
            raise LogdError(f"frame of {size} bytes is larger than max_message_bytes {self.max_message_bytes}: "
                            "logd would end the stream (OUT_OF_RANGE); split the content")
        block = self.block if block is None else block
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._raise_pending()
            while len(self._frames) >= self.buffer_max:
                left = None if deadline is None else deadline - time.monotonic()
                if not block or (left is not None and left <= 0):
                    raise BufferFull(f"buffer full: {len(self._frames)} frames not yet acknowledged")
                self._lock.wait(0.1 if left is None else min(left, 0.1))
                self._raise_pending()
            seq = None
            if self._next_seq is not None:
                seq = self._next_seq
                self._next_seq += 1
                frame.seq = seq
            self._frames.append(frame)
            self._queued += 1
            self._lock.notify_all()
            return seq

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Waits until every frame queued so far is settled (durable, or
        rejected: then it raises LogdError once). False if ``timeout`` ran
        out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._queued
            while self._settled < target:
                self._raise_pending()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(0.1 if left is None else min(left, 0.1))
            self._raise_pending()
            return True

    def pending(self) -> int:
        """Frames not yet settled."""
        with self._lock:
            return len(self._frames)

    def rejections(self) -> List[Tuple[int, str]]:
        """(seq, reason) of frames the server rejected (the first 10,000)."""
        with self._lock:
            return list(self._rejections)

    @property
    def error(self) -> Optional[LogdError]:
        """The non-retryable error that stopped the client, if any."""
        with self._lock:
            return self._fatal

    def close(self, timeout: Optional[float] = 10.0) -> bool:
        """Flushes (up to ``timeout``), then ends the stream; returns within
        ``timeout``. True if everything was durable."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            done = self.flush(timeout)
        except LogdError:
            done = False
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._wake.set()
        # Give the stream what is left of the timeout to end cleanly (the
        # server acks what it got), then cancel whatever is still in flight.
        # The thread is a daemon: it never keeps the process alive.
        left = 5.0 if deadline is None else max(0.0, deadline - time.monotonic())
        self._thread.join(timeout=left)
        self._channel.close()
        return done

    def __enter__(self) -> "LogdClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers (called with the lock held) --------------------------------

    def _raise_pending(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise LogdError("client is closed")
        if self._unreported_count:
            count, first = self._unreported_count, "; ".join(f"seq {s}: {r}" for s, r in self._unreported)
            self._unreported, self._unreported_count = [], 0
            more = f" (and {count - 3} more)" if count > 3 else ""
            raise LogdError(f"logd rejected {count} frame(s): {first}{more}")

    # -- the sender thread --------------------------------------------------

    def _run(self) -> None:
        backoff = 0.1
        while True:
            with self._lock:
                # Connect only when there is something to send.
                while not self._closed and self._settled == self._queued:
                    self._lock.wait(0.5)
                if self._closed:
                    return
            try:
                if self._next_seq is None:
                    self._resume_seq()
                if self._stream_once():
                    backoff = 0.1
            except grpc.RpcError as err:
                code = err.code()
                with self._lock:
                    self._stream = None
                    if self._closed:
                        return
                    if code not in RETRYABLE:
                        self._fatal = LogdError(f"logd refused the session ({code.name}): {err.details()}")
                        log.error("logd client for session %s stopped: %s; %d frames not sent",
                                  self.session_id, self._fatal, len(self._frames))
                        self._lock.notify_all()
                        return
                    waiting = len(self._frames)
                    if self._outage_since is None and waiting:
                        self._outage_since = time.monotonic()
                        log.warning("logd at %s unavailable (%s: %s); %d frames of session %s wait and are "
                                    "retried in the background", self.target, code.name, err.details(), waiting,
                                    self.session_id)
                delay = _retry_delay(err)
                wait = delay if delay is not None else backoff * (0.5 + random.random())
                backoff = min(backoff * 2, self.backoff_max)
                if self._wake.wait(wait):
                    return

    def _resume_seq(self) -> None:
        info = self._stub.GetSession(pb.SessionRequest(session_id=self.session_id), metadata=self._metadata,
                                     timeout=10)
        with self._lock:
            if self._next_seq is None:
                seq = info.last_seq + 1
                for frame in self._frames:  # queued before the base was known: all without seq
                    frame.seq = seq
                    seq += 1
                self._next_seq = seq

    def _requests(self, stream: _Stream) -> Iterator[pb.LogFrame]:
        """This stream's frames: from its start position on, in queue order,
        then new ones as they come. Ends when the stream is replaced (the
        frames it had read but not sent are resent by the next stream, which
        starts at the oldest unsettled frame) or the client closes."""
        while True:
            with self._lock:
                while self._stream is stream and stream.cursor >= self._queued and not self._closed:
                    self._lock.wait(0.5)
                if self._stream is not stream or self._closed:
                    return
                first = stream.cursor - self._settled
                n = min(self._queued - stream.cursor, self.batch_max)
                batch = [self._frames[first + i] for i in range(n)]
                stream.cursor += n
            yield from batch

    def _stream_once(self) -> bool:
        """Runs one stream until it ends; True if it settled anything."""
        with self._lock:
            self._gen += 1
            if self._gen > 1:
                self.reconnects += 1
            stream = _Stream(self._gen, self._settled)
            self._stream = stream
        call = self._stub.WriteLogBidi(self._requests(stream), metadata=self._metadata)
        progressed = False
        try:
            for ack in call:
                with self._lock:
                    through = stream.start + ack.through_index
                    if through > stream.cursor:
                        raise AssertionError(f"ack through position {through} beyond what the stream sent "
                                             f"({stream.cursor})")
                    for r in ack.rejections:
                        pos = stream.start + r.index
                        if pos >= self._settled:
                            seq = self._frames[pos - self._settled].seq
                            if len(self._unreported) < 3:
                                self._unreported.append((seq, r.reason))
                            self._unreported_count += 1
                            if len(self._rejections) < 10_000:
                                self._rejections.append((seq, r.reason))
                            self.rejected += 1
                            if self.rejected <= 10:  # the rest are counted, and raised from send()/flush()
                                log.error("logd rejected frame seq %d of session %s: %s%s", seq, self.session_id,
                                          r.reason, " (further rejections are not logged)"
                                          if self.rejected == 10 else "")
                    while self._settled < through:
                        frame = self._frames.popleft()
                        self._settled += 1
                        self.acked_through = max(self.acked_through, frame.seq)
                        progressed = True
                    if self._outage_since is not None and progressed:
                        log.warning("logd at %s reachable again after %.1f s; session %s resumed", self.target,
                                    time.monotonic() - self._outage_since, self.session_id)
                        self._outage_since = None
                    self._lock.notify_all()
        finally:
            with self._lock:
                if self._stream is stream:
                    self._stream = None
                self._lock.notify_all()
        with self._lock:
            if self._settled < self._queued and not self._closed:
                raise _StreamEnded()
        return progressed


class _StreamEnded(grpc.RpcError):
    """The server ended the stream with frames unsettled: reconnect and resend."""

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "stream ended with frames unacknowledged"

    def trailing_metadata(self):
        return ()
