"""The Python client against the real logd binary: acks, exactly once across
server crashes and client restarts, the logging.Handler, and the stubs."""

import json
import logging
import re
import subprocess
import sys
import threading
import time

from logd_client import LogdClient, LogdHandler
from conftest import REPO


def test_sent_frames_are_acked_and_written_once(server):
    with LogdClient(server.target, "py-basic", role="agent") as c:
        for i in range(100):
            c.send(f"line {i}", metadata={"i": i})
        assert c.flush(timeout=30) and c.acked_through == 100
    server.stop()
    lines = server.lines("py-basic")
    assert [l["seq"] for l in lines] == list(range(1, 101))
    assert lines[7]["content"] == "line 7" and lines[7]["metadata"] == {"i": 7} and lines[7]["role"] == "agent"


def test_a_new_client_continues_the_session_seq_from_the_server(server):
    a = LogdClient(server.target, "py-resume")
    for i in range(5):
        a.send(f"a{i}")
    assert a.close(timeout=30)
    b = LogdClient(server.target, "py-resume")
    assert b.send("b0") is None  # the seq base is asked when the first stream is set up, not in send()
    assert b.flush(timeout=30) and b.acked_through == 6
    assert b.send("b1") == 7
    assert b.close(timeout=30)
    server.stop()
    assert [l["content"] for l in server.lines("py-resume")] == ["a0", "a1", "a2", "a3", "a4", "b0", "b1"]


def test_handler_records_survive_a_server_kill_exactly_once(server):
    logger = logging.getLogger("py-handler-test")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = LogdHandler(server.target, "py-handler")
    logger.addHandler(handler)
    restarted = threading.Event()

    def crash_and_restart():
        time.sleep(0.3)
        server.kill9()
        time.sleep(0.5)
        server.start()
        restarted.set()

    t = threading.Thread(target=crash_and_restart)
    t.start()
    for i in range(10_000):
        logger.info("record %d", i)
        if i == 9_000:
            t.join()  # make sure the kill happened while records were flowing
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("with a traceback")
    assert restarted.is_set()
    assert handler.client.flush(timeout=60), f"{handler.client.pending()} records never acked"
    logger.removeHandler(handler)
    handler.close()
    server.stop()
    lines = server.lines("py-handler")
    contents = [l["content"] for l in lines]
    assert contents[:10_000] == [f"record {i}" for i in range(10_000)], "every record once, in order"
    assert contents[10_000] == "with a traceback"
    assert "ValueError: boom" in lines[10_000]["metadata"]["exc_text"]
    assert [l["seq"] for l in lines] == list(range(1, 10_002))
    assert lines[0]["role"] == "INFO" and lines[0]["metadata"]["logger"] == "py-handler-test"


def test_a_full_buffer_raises_when_not_blocking(tmp_path):
    from conftest import free_port
    from logd_client import LogdError
    import pytest
    c = LogdClient(f"127.0.0.1:{free_port()}", "nobody", buffer_max=3, block=False)
    for i in range(3):
        c.send(str(i))
    with pytest.raises(LogdError, match="buffer full"):
        c.send("one too many")
    assert not c.close(timeout=0.5)


def test_generated_stubs_match_the_proto():
    out = subprocess.run([sys.executable, str(REPO / "clients" / "python" / "gen_proto.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# -- logging never blocks the application -----------------------------------

SERVER_DOWN_SCRIPT = r"""
import json, logging, sys, time
from logd_client import LogdHandler
handler = LogdHandler(sys.argv[1], "down", queue_max=5000, close_timeout=1.0)
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel(logging.INFO)
lat = []
start = time.perf_counter()
for i in range(10_000):
    t = time.perf_counter()
    logging.info("record %d", i)
    lat.append(time.perf_counter() - t)
total = time.perf_counter() - start
lat.sort()
print(json.dumps({"total_s": total, "p50_us": lat[5000] * 1e6, "p99_us": lat[9900] * 1e6,
                  "max_us": lat[-1] * 1e6, "dropped": handler.dropped, "exiting_at": time.time()}), flush=True)
"""


def test_logging_never_blocks_and_exit_is_bounded_while_the_server_is_down(tmp_path):
    from conftest import free_port
    proc = subprocess.run([sys.executable, "-c", SERVER_DOWN_SCRIPT, f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=60)
    exited_at = time.time()
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    shutdown_s = exited_at - out["exiting_at"]
    print(f"server down: 10,000 emits in {out['total_s']:.3f} s, p50 {out['p50_us']:.1f} us, "
          f"p99 {out['p99_us']:.1f} us, max {out['max_us']:.0f} us; {out['dropped']} dropped; "
          f"exit (logging.shutdown, close_timeout 1.0 s) took {shutdown_s:.2f} s")
    assert out["total_s"] < 1.0
    assert out["dropped"] == 5000, "a queue of 5,000 keeps the first 5,000 and counts the rest"
    assert shutdown_s < 1.0 + 1.5, "exit waits for close_timeout, not more"
    assert proc.stderr.count("queue full") == 1, proc.stderr
    assert "5000 records not acknowledged" in proc.stderr


def test_the_block_policy_waits_at_most_its_timeout_then_drops(tmp_path):
    from conftest import free_port
    handler = LogdHandler(f"127.0.0.1:{free_port()}", "full", queue_max=2, on_full="block", block_timeout=0.05)
    logger = logging.getLogger("py-block-policy")
    logger.propagate = False
    logger.addHandler(handler)
    start = time.monotonic()
    for i in range(6):
        logger.warning("r%d", i)
    took = time.monotonic() - start
    assert handler.dropped == 4
    assert 4 * 0.05 <= took < 2.0
    logger.removeHandler(handler)
    handler.close_timeout = 0.2
    handler.close()
    assert handler.unsent == 2


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_records_sent_before_the_server_starts_arrive_once(tmp_path):
    from conftest import Server
    server = Server(tmp_path)  # not started yet: the port is free
    warnings = ListHandler()
    logging.getLogger("logd_client").addHandler(warnings)
    c = LogdClient(server.target, "py-late")
    try:
        start = time.monotonic()
        seqs = [c.send(f"early {i}") for i in range(1000)]
        assert time.monotonic() - start < 1.0, "send() must not wait for the server"
        assert seqs == [None] * 1000, "no seq before the session's base is known"
        assert not c.flush(timeout=1.5)
        server.start()
        assert c.flush(timeout=60)
        assert c.send("late") == 1001
        assert c.close(timeout=30)
        server.stop()
        assert [l["content"] for l in server.lines("py-late")] == [f"early {i}" for i in range(1000)] + ["late"]
        assert [l["seq"] for l in server.lines("py-late")] == list(range(1, 1002))
        outage = [m for m in warnings.messages if "unavailable" in m]
        assert len(outage) == 1, f"one warning per outage, not one per retry: {warnings.messages}"
        # The count is what waited when the first connection attempt failed:
        # send() may still have been queueing then.
        waiting = re.search(r"; (\d+) frames of session py-late wait", outage[0])
        assert waiting and 1 <= int(waiting.group(1)) <= 1000, outage[0]
        assert any("reachable again" in m for m in warnings.messages)
    finally:
        logging.getLogger("logd_client").removeHandler(warnings)
        server.kill9()


def test_a_bad_session_id_is_refused_at_once():
    import pytest
    from conftest import free_port
    for bad in ["../etc", "", "a/b", "x" * 200]:
        with pytest.raises(ValueError, match="invalid session_id"):
            LogdClient(f"127.0.0.1:{free_port()}", bad)


def test_a_non_retryable_status_stops_the_client_with_the_servers_message(tmp_path):
    import pytest
    from conftest import Server
    from logd_client import LogdError
    token_file = tmp_path / "tokens"
    token_file.write_text("right-token\n")
    server = Server(tmp_path, {"LOGD_AUTH_TOKEN_FILE": str(token_file)}).start()
    try:
        c = LogdClient(server.target, "py-auth", token="wrong-token")
        c.send("never stored")
        start = time.monotonic()
        with pytest.raises(LogdError, match="UNAUTHENTICATED"):
            c.flush(timeout=30)
        assert time.monotonic() - start < 5, "not retried"
        with pytest.raises(LogdError, match="UNAUTHENTICATED"):
            c.send("again")
        c.close(timeout=1)

        # The handler reports it once through handleError, then counts drops.
        handler = LogdHandler(server.target, "py-auth-h", token="wrong-token")
        handler.handleError = lambda record: errors.append(record)
        errors = []
        logger = logging.getLogger("py-auth-handler")
        logger.propagate = False
        logger.addHandler(handler)
        logger.warning("first")
        deadline = time.monotonic() + 10
        while handler.client.error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        for i in range(100):
            logger.warning("after %d", i)
        assert len(errors) == 1 and handler.dropped == 100
        logger.removeHandler(handler)
        handler.close_timeout = 0.5
        handler.close()

        good = LogdClient(server.target, "py-auth", token="right-token")
        good.send("stored")
        assert good.close(timeout=30)
    finally:
        server.kill9()


def test_a_rejected_frame_raises_once_and_its_neighbours_are_kept(tmp_path):
    import pytest
    from conftest import Server
    from logd_client import LogdError
    server = Server(tmp_path, {"LOG_MAX_FRAME_BYTES": "2048"}).start()
    try:
        c = LogdClient(server.target, "py-reject")
        c.send("before")
        c.send("x" * 4000)
        c.send("after")
        with pytest.raises(LogdError, match=r"rejected 1 frame\(s\): seq 2: "):
            c.flush(timeout=30)
        assert c.flush(timeout=30), "raised once; the client goes on"
        c.send("later")
        assert c.close(timeout=30)
        assert [s for s, _ in c.rejections()] == [2]
        server.stop()
        assert [l["content"] for l in server.lines("py-reject")] == ["before", "after", "later"]
    finally:
        server.kill9()


def test_a_frame_over_the_message_limit_is_refused_by_send():
    import pytest
    from conftest import free_port
    from logd_client import LogdError
    c = LogdClient(f"127.0.0.1:{free_port()}", "py-huge", max_message_bytes=10_000)
    with pytest.raises(LogdError, match="larger than max_message_bytes 10000"):
        c.send("x" * 20_000)
    assert c.pending() == 0
    c.close(timeout=0.1)


# -- one target syntax ------------------------------------------------------

def test_every_target_form_is_accepted():
    import pytest
    from logd_client.client import parse_target
    assert parse_target("127.0.0.1:50051") == ("127.0.0.1:50051", None)
    assert parse_target("http://127.0.0.1:50051") == ("127.0.0.1:50051", False)
    assert parse_target("http://localhost:50051/") == ("localhost:50051", False)
    assert parse_target("https://logd.example:443") == ("logd.example:443", True)
    assert parse_target("HTTPS://logd.example:443") == ("logd.example:443", True)
    for bad in ["", "ftp://x:1", "http://x:1/path", "a b:1"]:
        with pytest.raises(ValueError, match="invalid target"):
            parse_target(bad)


def test_an_http_target_reaches_the_server(server):
    with LogdClient(f"http://{server.target}", "py-http") as c:
        c.send("over http://")
        assert c.flush(timeout=30)
    server.stop()
    assert [l["content"] for l in server.lines("py-http")] == ["over http://"]


# -- metadata ---------------------------------------------------------------

def test_metadata_keeps_integers_extras_and_unusual_values(server):
    import datetime
    import decimal
    handler = LogdHandler(server.target, "py-meta")
    logger = logging.getLogger("py-meta")
    logger.propagate = False
    logger.addHandler(handler)
    when = datetime.datetime(2026, 12, 1, 3, 4, 5, tzinfo=datetime.timezone.utc)
    logger.warning("with extras", extra={"step": 7, "when": when, "price": decimal.Decimal("1.10"),
                                         "raw": b"\xffok", "big": 2 ** 60 + 1, "ratio": 0.5,
                                         "nested": {"k": [1, "two", None, True]}, "obj": object})
    with LogdClient(server.target, "py-meta-client") as c:
        c.send("direct", metadata={"when": when, "count": 3, "neg": -2})
        assert c.flush(timeout=30)
    assert handler.client.flush(timeout=30)
    logger.removeHandler(handler)
    handler.close()
    server.stop()
    meta = server.lines("py-meta")[0]["metadata"]
    assert meta["step"] == 7 and meta["when"] == "2026-12-01T03:04:05+00:00" and meta["price"] == "1.10"
    assert meta["raw"] == "\\xffok" and meta["big"] == str(2 ** 60 + 1) and meta["ratio"] == 0.5
    assert meta["nested"] == {"k": [1, "two", None, True]} and meta["obj"] == "<class 'object'>"
    assert meta["level"] == "WARNING" and meta["logger"] == "py-meta"
    raw = (server.log_dir / "py-meta.logtmp").read_text()
    assert '"step":7,' in raw or '"step":7}' in raw, f"integers are written as integers: {raw}"
    assert f'"line":{meta["line"]}' in raw and ".0" not in raw.split('"line":')[1][:8]
    direct = server.lines("py-meta-client")[0]["metadata"]
    assert direct == {"when": "2026-12-01T03:04:05+00:00", "count": 3, "neg": -2}


def test_flush_and_close_return_within_their_timeout_while_the_server_is_down():
    from conftest import free_port
    c = LogdClient(f"127.0.0.1:{free_port()}", "py-timeouts")
    for i in range(100):
        c.send(f"r{i}")
    for call in (lambda: c.flush(timeout=0.3), lambda: c.close(timeout=0.3)):
        start = time.monotonic()
        assert call() is False
        took = time.monotonic() - start
        assert took < 0.3 + 0.25, f"took {took:.3f} s"
