"""The Python client against the real logd binary: acks, exactly once across
server crashes and client restarts, the logging.Handler, and the stubs."""

import logging
import subprocess
import sys
import threading
import time

from logd_client import LogdClient, LogdHandler
from conftest import REPO


def test_sent_frames_are_acked_and_written_once(server):
    with LogdClient(server.target, "py-basic", role="agent") as c:
        seqs = [c.send(f"line {i}", metadata={"i": i}) for i in range(100)]
        assert c.flush(timeout=30)
    assert seqs == list(range(1, 101))
    server.stop()
    lines = server.lines("py-basic")
    assert [l["seq"] for l in lines] == seqs
    assert lines[7]["content"] == "line 7" and lines[7]["metadata"] == {"i": 7.0} and lines[7]["role"] == "agent"


def test_a_new_client_continues_the_session_seq_from_the_server(server):
    a = LogdClient(server.target, "py-resume")
    for i in range(5):
        a.send(f"a{i}")
    assert a.close(timeout=30)
    b = LogdClient(server.target, "py-resume")
    assert b.send("b0") == 6
    assert b.close(timeout=30)
    server.stop()
    assert [l["content"] for l in server.lines("py-resume")] == ["a0", "a1", "a2", "a3", "a4", "b0"]


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
    c._next_seq = 1  # no server to ask: start at 1
    for i in range(3):
        c.send(str(i))
    with pytest.raises(LogdError, match="buffer full"):
        c.send("one too many")
    assert not c.close(timeout=0.5)


def test_generated_stubs_match_the_proto():
    out = subprocess.run([sys.executable, str(REPO / "clients" / "python" / "gen_proto.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
