"""Fixtures: the real `logd` binary on a free loopback port in a temp dir."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]


def logd_bin() -> str:
    path = os.environ.get("LOGD_BIN") or str(REPO / "target" / "debug" / "logd")
    if not os.path.exists(path):
        pytest.fail(f"logd binary not found at {path}: build it (cargo build) or set LOGD_BIN")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `logd serve` that can be killed and restarted on the same port."""

    def __init__(self, root: pathlib.Path, extra_env=None):
        self.root = root
        self.log_dir = root / "logs"
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.extra_env = extra_env or {}
        self.proc = None
        self.starts = 0

    def start(self):
        env = dict(os.environ, LOG_DIR=str(self.log_dir), LOGD_LISTEN=self.target, LOGD_METRICS_LISTEN="off",
                   RUST_LOG="warn", **self.extra_env)
        self.starts += 1
        err = open(self.root / f"server-{self.starts}.stderr", "w")
        self.proc = subprocess.Popen([logd_bin(), "serve"], env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        deadline = time.time() + 60
        for line in self.proc.stdout:
            if line.startswith("logd: listening on"):
                return self
            if time.time() > deadline:
                break
        raise RuntimeError(f"logd did not start; see {err.name}")

    def start_and_kill_while_recovering(self):
        """Starts logd and kills it with SIGKILL as soon as it says it is
        recovering (before it listens): a crash in the middle of recovery."""
        env = dict(os.environ, LOG_DIR=str(self.log_dir), LOGD_LISTEN=self.target, LOGD_METRICS_LISTEN="off",
                   RUST_LOG="warn", **self.extra_env)
        self.starts += 1
        with open(self.root / f"server-{self.starts}.stderr", "w") as err:
            proc = subprocess.Popen([logd_bin(), "serve"], env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        line = proc.stdout.readline()
        proc.kill()
        proc.wait()
        proc.stdout.close()
        assert line.startswith("logd: recovering on"), f"unexpected first line {line!r}"

    def kill9(self):
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=30) == 0, "logd did not exit 0 after SIGTERM"
            self.proc = None

    def lines(self, session: str):
        """Every JSON line of the session's files, in file order."""
        out = []
        files = sorted(p for p in self.log_dir.iterdir() if p.name.startswith(session + ".") and p.suffix == ".log")
        files += [self.log_dir / f"{session}.logtmp"]
        for f in files:
            if f.exists():
                out += [json.loads(l) for l in f.read_text().splitlines()]
        return out


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path).start()
    yield s
    s.kill9()
