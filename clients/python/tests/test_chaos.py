"""Chaos: agents keep logging through LogdHandler and LogdClient while the
real server is killed with SIGKILL and restarted at random moments (once while
it is still recovering). Every record whose flush() returned True must then be
in the session files exactly once, in order.

The seed is printed; rerun one with LOGD_CHAOS_SEED=N. LOGD_CHAOS_KILLS sets
the number of kills (default 24)."""

import logging
import os
import random
import threading
import time

from logd_client import LogdClient, LogdHandler

from conftest import Server

KILLS = int(os.environ.get("LOGD_CHAOS_KILLS", "24"))


class Writer(threading.Thread):
    """Sends numbered records and remembers which ones flush() confirmed."""

    def __init__(self, name, send, flush, rng, stop, running):
        super().__init__(name=name, daemon=True)
        self.send, self.flush, self.rng, self.stop, self.running = send, flush, rng, stop, running
        self.sent = 0          # records 0..sent-1 were handed to the client
        self.confirmed = 0     # records 0..confirmed-1 were confirmed durable by flush()
        self.flushes = [0, 0]  # [returned True, returned False]

    def run(self):
        next_flush = self.rng.randint(20, 400)
        while not self.stop.is_set():
            self.running.wait()
            self.send(f"{self.name}:{self.sent}")
            self.sent += 1
            if self.sent >= next_flush:
                upto = self.sent
                ok = self.flush(self.rng.uniform(0.2, 3.0))
                self.flushes[0 if ok else 1] += 1
                if ok:
                    self.confirmed = max(self.confirmed, upto)
                next_flush = self.sent + self.rng.randint(20, 400)
                if self.rng.random() < 0.3:  # agents idle: a kill then finds the stream waiting
                    time.sleep(self.rng.uniform(0.05, 0.6))
            elif self.rng.random() < 0.02:
                time.sleep(self.rng.uniform(0, 0.02))


def test_confirmed_records_survive_repeated_server_kills_exactly_once_and_in_order(tmp_path, capsys):
    seed = int(os.environ.get("LOGD_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    rng = random.Random(seed)
    with capsys.disabled():
        print(f"\nchaos: seed {seed} (LOGD_CHAOS_SEED={seed} reruns it), {KILLS} kills")
    server = Server(tmp_path).start()
    stop = threading.Event()
    running = threading.Event()  # cleared: writers pause (idle agents across a restart)
    running.set()
    try:
        # Session "h": two threads share one LogdHandler. Sessions "c0", "c1":
        # a LogdClient each. Session "s": two threads share one LogdClient.
        logger = logging.getLogger("chaos")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        handler = LogdHandler(server.target, "chaos-h", queue_max=1_000_000)
        logger.addHandler(handler)
        clients = {name: LogdClient(server.target, f"chaos-{name}") for name in ("c0", "c1", "s")}
        writers = [
            Writer("h0", logger.info, handler.client.flush, random.Random(rng.random()), stop, running),
            Writer("h1", logger.info, handler.client.flush, random.Random(rng.random()), stop, running),
        ]
        for name in ("c0", "c1"):
            writers.append(Writer(name, clients[name].send, clients[name].flush, random.Random(rng.random()), stop, running))
        for name in ("s0", "s1"):
            writers.append(Writer(name, clients["s"].send, clients["s"].flush, random.Random(rng.random()), stop, running))
        sessions = {"chaos-h": ["h0", "h1"], "chaos-c0": ["c0"], "chaos-c1": ["c1"], "chaos-s": ["s0", "s1"]}
        for w in writers:
            w.start()

        kills = 0
        recovering_kill_at = rng.randrange(KILLS)
        quiet_kills = 0
        for k in range(KILLS):
            time.sleep(rng.uniform(0.15, 0.8))
            quiet = rng.random() < 0.4
            if quiet:  # every writer idle from before the kill until the server is back
                running.clear()
                time.sleep(rng.uniform(0.3, 0.6))
                quiet_kills += 1
            server.kill9()
            kills += 1
            time.sleep(rng.uniform(0, 0.3))
            if k == recovering_kill_at:
                server.start_and_kill_while_recovering()
                kills += 1
            server.start()
            if quiet:
                time.sleep(rng.uniform(0, 0.2))
                running.set()
        time.sleep(0.5)
        stop.set()
        running.set()
        for w in writers:
            w.join(timeout=30)
            assert not w.is_alive(), f"writer {w.name} is stuck"

        # With the server up, everything sent must become durable.
        assert handler.client.flush(timeout=60), f"{handler.client.pending()} handler records never acked"
        for name, c in clients.items():
            assert c.flush(timeout=60), f"{c.pending()} records of {name} never acked"
        assert handler.dropped == 0
        logger.removeHandler(handler)
        handler.close()
        for c in clients.values():
            c.close(timeout=10)
        server.stop()

        found_total = 0
        for session, names in sessions.items():
            lines = server.lines(session)
            seqs = [l["seq"] for l in lines]
            assert seqs == sorted(set(seqs)), f"{session}: seqs not strictly increasing (seed {seed})"
            last = {n: -1 for n in names}
            seen = set()
            for l in lines:
                name, i = l["content"].rsplit(":", 1)
                i = int(i)
                assert name in last, f"{session}: foreign record {l['content']!r}"
                assert (name, i) not in seen, f"{session}: {l['content']} written twice (seed {seed})"
                seen.add((name, i))
                assert i > last[name], f"{session}: {l['content']} after {name}:{last[name]} (seed {seed})"
                last[name] = i
            for w in writers:
                if w.name in names:
                    missing = [i for i in range(w.confirmed) if (w.name, i) not in seen]
                    assert not missing, (f"{session}: {len(missing)} confirmed records of {w.name} missing, "
                                         f"first {missing[:5]} (seed {seed})")
                    lost = [i for i in range(w.sent) if (w.name, i) not in seen]
                    assert not lost, (f"{session}: {len(lost)} sent records of {w.name} missing after the final "
                                      f"flush, first {lost[:5]} (seed {seed})")
            found_total += len(lines)
        sent = sum(w.sent for w in writers)
        confirmed = sum(w.confirmed for w in writers)
        flush_ok = sum(w.flushes[0] for w in writers)
        flush_late = sum(w.flushes[1] for w in writers)
        with capsys.disabled():
            print(f"chaos: seed {seed}: {kills} kills ({quiet_kills} with writers idle); records sent {sent}, confirmed by flush() before the end "
                  f"{confirmed}, found {found_total} (each once, in order); flush() True {flush_ok}, "
                  f"timed out {flush_late}")
        assert found_total == sent
        assert kills >= 20
    finally:
        stop.set()
        server.kill9()
