"""Scale-out, tested: three real logd instances (each its own LOG_DIR, one
shared redis-server) behind a real HAProxy 2.6 running the shipped
deploy/haproxy.cfg, which hashes sessions on `x-session-id` and health-checks
the instances over gRPC.

Many sessions write through the balancer with the Python client while one
instance is killed with SIGKILL and later restarted; the clients are never
told. At the end every confirmed record of every session must be found by
`logd cat` over the three directories exactly once, in order. `logd bench`
measures the aggregate throughput through the balancer against one instance
directly in the same run (printed; debug build, 2 cores: overhead, not scale).

HAProxy and redis-server are installed with apt-get when missing and running
as root (as scripts/test does); otherwise the test says what to install."""

import json
import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest
import redis

from logd_client import LogdClient

from conftest import REPO, Server, free_port, logd_bin

HAPROXY_CFG = REPO / "deploy" / "haproxy.cfg"
INSTANCES = 3
WRITERS = 16
IDLE_SESSION = "lb-idle"
LATE_SESSIONS = 40


def ensure_command(command: str, package: str) -> str:
    """The path of `command`, installing `package` with apt-get if missing."""
    path = shutil.which(command)
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env,
                          stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, check=True,
                           stdout=subprocess.DEVNULL)
        path = shutil.which(command)
    if not path:
        pytest.fail(f"{command} is missing; install it first, e.g. 'sudo apt-get install -y {package}'")
    return path


def wait_until(what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


class RedisServer:
    def __init__(self, root: pathlib.Path):
        binary = ensure_command("redis-server", "redis-server")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(root)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port)

        def pong():
            try:
                return self.client.ping()
            except redis.ConnectionError:
                return False
        wait_until("redis-server to answer PING", pong, 10)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class HAProxy:
    """HAProxy running the shipped config, plus a stats socket to watch it."""

    def __init__(self, root: pathlib.Path, targets):
        binary = ensure_command("haproxy", "haproxy")
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.sock = str(root / "haproxy.sock")
        extra = root / "haproxy-test.cfg"
        # A global section read first: the stats socket and logs for this test.
        extra.write_text(f"global\n    stats socket {self.sock} level admin\n    log stderr format raw local0 info\n")
        env = dict(os.environ, LOGD_LB_BIND=self.target,
                   **{f"LOGD_{i}": t for i, t in enumerate(targets)})
        self.log = open(root / "haproxy.log", "w")
        self.proc = subprocess.Popen([binary, "-db", "-f", str(extra), "-f", str(HAPROXY_CFG)], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def states(self):
        """{server name: status} from `show stat` (UP, DOWN, ...)."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(self.sock)
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except (FileNotFoundError, ConnectionRefusedError):
            return {}
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, l.split(","))) for l in lines[1:] if l]
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "logd"}

    def wait_state(self, server: str, state: str, timeout: float) -> float:
        """Waits until HAProxy reports `server` in `state`; returns when."""
        assert self.proc.poll() is None, "haproxy exited; see haproxy.log"
        wait_until(f"haproxy to see {server} {state}", lambda: self.states().get(server) == state, timeout)
        return time.monotonic()

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def health_check_bytes() -> str:
    """The raw h2c gRPC Health/Check request deploy/haproxy.cfg sends,
    built from its parts (see the comment there)."""
    def frame(kind, flags, stream, payload):
        return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

    def literal(name, value):  # HPACK literal without indexing, no Huffman
        v = value.encode()
        if isinstance(name, int):  # an indexed name below 15
            return bytes([name, len(v)]) + v
        return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(v)]) + v
    headers = (b"\x83\x86"  # :method POST, :scheme http
               + literal(4, "/grpc.health.v1.Health/Check") + literal(1, "logd")
               + b"\x0f\x10" + bytes([16]) + b"application/grpc"  # content-type (static index 31)
               + literal("te", "trailers"))
    service = b"logging.v1.LogService"
    message = b"\x0a" + bytes([len(service)]) + service
    body = b"\x00" + struct.pack(">I", len(message)) + message
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    return (preface + frame(4, 0, 0, b"") + frame(1, 4, 1, headers) + frame(0, 1, 1, body)).hex()


def test_the_shipped_haproxy_config_checks_grpc_health_and_outlasts_logd_stream_idle_timeout():
    cfg = HAPROXY_CFG.read_text()
    sent = [l.split()[-1] for l in cfg.splitlines() if l.strip().startswith("tcp-check send-binary")]
    assert sent == [health_check_bytes()]
    # Healthy: the HealthCheckResponse message `status: SERVING` (= 1).
    assert "tcp-check expect binary 00000000020801" in cfg
    # Per-stream inactivity limits above logd's own stream idle timeout
    # (LOGD_STREAM_IDLE_TIMEOUT_SECONDS, 300 s): logd ends quiet streams, with
    # DEADLINE_EXCEEDED, before the balancer would reset them.
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for name in ("client", "server"):
        value = next(l.split()[2] for l in cfg.splitlines() if l.split()[:2] == ["timeout", name])
        number = value.rstrip("hms")
        seconds = int(number) * units[value[len(number):] or "ms"]
        assert seconds > 300, f"timeout {name} {value} would cut a quiet logd stream"


class Writer(threading.Thread):
    """One session: numbered records, a flush every 20; remembers what each
    flush confirmed and when."""

    def __init__(self, target, session, stop):
        super().__init__(name=session, daemon=True)
        self.client = LogdClient(target, session, backoff_max=0.5)
        self.session, self.stop = session, stop
        self.sent = 0
        self.confirmed = 0
        self.flushes = []  # (started, ended, ok)

    def run(self):
        while not self.stop.is_set():
            self.client.send(f"{self.session}:{self.sent}:" + "x" * 100)
            self.sent += 1
            if self.sent % 20 == 0:
                upto, t0 = self.sent, time.monotonic()
                ok = self.client.flush(1.0)
                self.flushes.append((t0, time.monotonic(), ok))
                if ok:
                    self.confirmed = upto
            time.sleep(0.004)

    def progressed_after(self, t):
        """When the first flush started after `t` succeeded, or None."""
        return next((end for start, end, ok in self.flushes if ok and start >= t), None)


def logd_cat(session, dirs):
    """`logd cat` of a session over `dirs`: (JSON lines, duplicates dropped)."""
    out = subprocess.run([logd_bin(), "cat", "--session", session, *map(str, dirs)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    dups = 0
    for line in out.stderr.splitlines():
        if "duplicate" in line:
            dups = int(line.split("dropped ")[1].split()[0])
    return [json.loads(l) for l in out.stdout.splitlines()], dups


def sessions_in(log_dir: pathlib.Path, prefix: str):
    """Sessions with a file in `log_dir` whose id starts with `prefix`."""
    names = set()
    for p in log_dir.iterdir():
        if p.name.startswith(prefix):
            names.add(p.name.split(".")[0])
    return names


def bench(target, seconds):
    out = subprocess.run([logd_bin(), "bench", "--target", target, "--streams", "12", "--sessions", "12",
                          "--frame-bytes", "256", "--duration", str(seconds), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"logd bench failed: {out.stderr}"
    return json.loads(out.stdout)


def test_sessions_through_haproxy_survive_an_instance_killed_and_restarted_each_record_once(tmp_path, capsys):
    redis_server = RedisServer(tmp_path)
    servers = []
    lb = None
    stop = threading.Event()
    writers = []
    try:
        for i in range(INSTANCES):
            root = tmp_path / f"logd-{i}"
            root.mkdir()
            servers.append(Server(root, {
                "LOGD_INSTANCE": f"logd-{i}", "REDIS_URL": redis_server.url,
                # Small files: sessions rotate and gzip many times in the run.
                "LOG_MAX_SIZE_BYTES": "65536",
            }).start())
        dirs = [s.log_dir for s in servers]
        lb = HAProxy(tmp_path, [s.target for s in servers])
        for i in range(INSTANCES):
            lb.wait_state(f"logd-{i}", "UP", 20)

        # The idle stream: one record now, the next one at the very end.
        idle = LogdClient(lb.target, IDLE_SESSION)
        idle.send("idle:0")
        assert idle.flush(10)
        idle_since = time.monotonic()
        # Acked means in the WAL; the session file follows shortly.
        idle_home = wait_until("the idle session's file", lambda: next(
            (i + 1 for i, d in enumerate(dirs) if (d / f"{IDLE_SESSION}.logtmp").exists()), None), 10) - 1

        # Throughput: one instance directly, then the three through HAProxy.
        direct = bench(servers[0].target, 3)
        direct_sessions = sessions_in(dirs[0], "bench-")
        balanced = bench(lb.target, 3)
        bench_dirs = {}
        for i, d in enumerate(dirs):
            for s in sessions_in(d, "bench-") - direct_sessions:
                bench_dirs.setdefault(s, []).append(i)
        # Each bench stream writes one session with x-session-id: HAProxy
        # keeps a session on one instance and spreads the sessions.
        assert len(bench_dirs) == 12, bench_dirs
        assert all(len(ds) == 1 for ds in bench_dirs.values()), f"a bench session on two instances: {bench_dirs}"
        assert len({ds[0] for ds in bench_dirs.values()}) >= 2, f"HAProxy sent every session to one: {bench_dirs}"
        assert balanced["errors"] == 0 and direct["errors"] == 0

        writers = [Writer(lb.target, f"lb-{k}", stop) for k in range(WRITERS)]
        for w in writers:
            w.start()
        wait_until("every writer to confirm a flush", lambda: all(w.confirmed > 0 for w in writers), 30)
        wait_until("every writer's file", lambda: all(any((d / f"{w.session}.logtmp").exists() for d in dirs)
                                                      for w in writers), 10)
        homes = {i: {w.session for w in writers if (dirs[i] / f"{w.session}.logtmp").exists()}
                 for i in range(INSTANCES)}
        victim = max((i for i in range(INSTANCES) if i != idle_home), key=lambda i: len(homes[i]))
        moved = homes[victim]
        assert moved, f"no writer session on logd-{victim}: {homes}"
        time.sleep(3)

        servers[victim].kill9()
        killed_at = time.monotonic()
        down_at = lb.wait_state(f"logd-{victim}", "DOWN", 10)
        wait_until("every writer to confirm a flush after the kill",
                   lambda: all(w.progressed_after(killed_at) for w in writers), 60)
        failover = max(w.progressed_after(killed_at) for w in writers if w.session in moved) - killed_at
        time.sleep(3)

        servers[victim].start()
        restarted_at = time.monotonic()
        up_at = lb.wait_state(f"logd-{victim}", "UP", 30)
        time.sleep(3)
        stop.set()
        for w in writers:
            w.join(timeout=30)
            assert not w.is_alive(), f"writer {w.session} is stuck"
            assert w.client.close(timeout=60), f"{w.client.pending()} records of {w.session} never acked"
        # Streams of sessions on the surviving instances were never cut: not
        # by the kill, not by the restart (consistent hashing moves only the
        # dead instance's sessions), not by a balancer timeout.
        kept = [w for w in writers if w.session not in moved]
        assert all(w.client.reconnects == 0 for w in kept), [(w.session, w.client.reconnects) for w in kept]
        assert all(w.client.reconnects >= 1 for w in writers if w.session in moved)

        # New sessions after the restart: the restarted instance gets its share.
        for k in range(LATE_SESSIONS):
            c = LogdClient(lb.target, f"lb-late-{k}")
            for n in range(5):
                c.send(f"lb-late-{k}:{n}")
            assert c.close(timeout=30), f"lb-late-{k} not acked"
        late_on = sessions_in(dirs[victim], "lb-late-")
        assert late_on, f"no new session went to the restarted logd-{victim}"

        # The idle stream stayed up through the whole run: still the same stream.
        idle.send("idle:1")
        assert idle.flush(10)
        idle_seconds = time.monotonic() - idle_since
        assert idle.reconnects == 0, f"the idle stream was reconnected {idle.reconnects} times"
        idle.close()

        # Every record, through `logd cat` over the three directories.
        sent = confirmed = found = dups_total = split = 0
        for w in writers:
            lines, dups = logd_cat(w.session, dirs)
            seqs = [l["seq"] for l in lines]
            assert seqs == sorted(set(seqs)), f"{w.session}: logd cat printed seqs out of order"
            numbers = [int(l["content"].split(":")[1]) for l in lines]
            assert numbers == list(range(w.sent)), (
                f"{w.session}: records {w.sent} sent, logd cat found {len(numbers)}; first wrong at "
                f"{next((i for i, n in enumerate(numbers) if n != i), len(numbers))}")
            assert all(l["session_id"] == w.session for l in lines)
            sent, confirmed, found = sent + w.sent, confirmed + w.confirmed, found + len(lines)
            dups_total += dups
            split += sum(1 for d in dirs if any(p.name.startswith(w.session + ".") for p in d.iterdir())) > 1
        assert found == sent
        for k in range(LATE_SESSIONS):
            lines, _ = logd_cat(f"lb-late-{k}", dirs)
            assert [l["content"] for l in lines] == [f"lb-late-{k}:{n}" for n in range(5)]
        assert [l["content"] for l in logd_cat(IDLE_SESSION, dirs)[0]] == ["idle:0", "idle:1"]

        # Events name their instance; the path is in that instance's LOG_DIR.
        instances = {f"logd-{i}": d for i, d in enumerate(dirs)}
        for s in servers:
            s.stop()
        events = [json.loads(f[b"content"]) for _, f in redis_server.client.xrange("logd:events")]
        assert events, "no events on the stream"
        compressed = [e for e in events if e["kind"] == "compressed"]
        for e in events:
            assert e["instance"] in instances, e
            assert e["event_id"].endswith("@" + e["instance"]), e
        for e in compressed:
            assert (instances[e["instance"]] / e["path"]).exists(), e
        ids = [e["event_id"] for e in events]
        assert len(set(ids)) >= len(ids) - INSTANCES, "events resent beyond one per instance"
        assert len({e["instance"] for e in events}) >= 2

        with capsys.disabled():
            print(f"\nbalancer: {WRITERS} sessions through HAProxy: records sent {sent}, confirmed by flush() "
                  f"before the end {confirmed}, found by logd cat {found} (each once, in order); duplicates "
                  f"across instances dropped by logd cat {dups_total}; sessions on the killed logd-{victim}: "
                  f"{len(moved)}, on two instances at the end: {split}; HAProxy saw it DOWN "
                  f"{down_at - killed_at:.2f} s after SIGKILL, every moved session confirmed again after "
                  f"{failover:.2f} s; restarted, UP again after {up_at - restarted_at:.2f} s, {len(late_on)} of "
                  f"{LATE_SESSIONS} new sessions went to it; idle stream up {idle_seconds:.0f} s; "
                  f"{len(events)} events ({len(compressed)} compressed), {len(ids) - len(set(ids))} resent")
            print(f"balancer: bench 12 streams x 256 B (debug build): one instance direct "
                  f"{direct['frames_per_sec']:.0f} frames/s (p50 {direct['p50_ms']:.2f} ms), three behind HAProxy "
                  f"{balanced['frames_per_sec']:.0f} frames/s (p50 {balanced['p50_ms']:.2f} ms)")
    finally:
        stop.set()
        for w in writers:
            w.client.close(timeout=1)
        if lb:
            lb.stop()
        for s in servers:
            s.kill9()
        redis_server.stop()
