"""The README's ETL consumer, run as written (the code block is taken from
README.md) against a real logd and a real redis-server: it ships each file
once, survives a resent event, a file already shipped and deleted, and a
file deleted by hand."""

import json
import re
import subprocess
import time

from logd_client import LogdClient

from conftest import REPO, Server, logd_bin
from test_balancer import RedisServer, wait_until


def readme_consumer():
    text = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(import json, os, zlib, redis\n.*?)```", text, re.S)
    assert block, "the consumer example is not in README.md"
    return block.group(1)


def test_the_readme_etl_consumer_ships_each_file_once_and_survives_resends_and_deleted_files(tmp_path, capsys):
    redis_server = RedisServer(tmp_path)
    server = Server(tmp_path, {"REDIS_URL": redis_server.url, "LOGD_INSTANCE": "logd-0"}).start()
    try:
        for name in ("etl-a", "etl-b", "etl-c"):
            c = LogdClient(server.target, name)
            for i in range(50):
                c.send(f"{name} line {i}")
            assert c.close(timeout=30)
        out = subprocess.run([logd_bin(), "rotate", "--all", "--target", server.target], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr

        def compressed_events():
            entries = redis_server.client.xrange("logd:events")
            events = [json.loads(f[b"content"]) for _, f in entries]
            return events if sum(e["kind"] == "compressed" for e in events) == 3 else None
        events = wait_until("3 compressed events", compressed_events, 30)

        etl = {"__name__": "readme_etl"}  # not "__main__": define, do not loop
        exec(compile(readme_consumer(), "README.md", "exec"), etl)
        etl["r"] = redis_server.client
        etl["LOG_DIRS"] = {"logd-0": str(server.log_dir)}
        compressed = [e for e in events if e["kind"] == "compressed"]
        # A file deleted by hand before it was shipped: skipped, no crash.
        (server.log_dir / compressed[2]["path"]).unlink()
        for e in events:
            etl["ship"](e)
        printed = capsys.readouterr().out
        assert printed.count("ready:") == 2, printed
        assert printed.count("gone before it was shipped") == 1, printed
        shipped = {m.decode() for m in redis_server.client.smembers("etl:shipped")}
        assert shipped == {e["event_id"] for e in compressed[:2]}
        assert all(e["event_id"].endswith("@logd-0") for e in events)
        assert not any((server.log_dir / e["path"]).exists() for e in compressed), "shipped files are deleted"
        # Every event again (a resend, or this worker crashed before XACK):
        # nothing is shipped twice and nothing fails.
        for e in events + events:
            etl["ship"](e)
        again = capsys.readouterr().out
        assert "ready:" not in again, again
    finally:
        server.kill9()
        redis_server.stop()
