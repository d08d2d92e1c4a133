"""OTLP/gRPC logs ingestion with the real OpenTelemetry Python SDK
(`LoggingHandler` → `BatchLogRecordProcessor` → `OTLPLogExporter`, in
subprocesses: otlp_producer.py) against the real logd binary: several
processes land exactly once with their attributes, and a kill -9 of logd in
the middle of the exports loses no record the exporter saw succeed."""

import collections
import json
import pathlib
import subprocess
import sys
import time

import grpc

from logd_client._proto.logging.v1 import admin_pb2, admin_pb2_grpc

PRODUCER = pathlib.Path(__file__).with_name("otlp_producer.py")


def producer(server, session, count, *extra):
    return subprocess.Popen(
        [sys.executable, str(PRODUCER), "--endpoint", server.target, "--session", session, "--count", str(count),
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"producer failed ({proc.returncode}):\n{err}"
    return json.loads(out.strip().splitlines()[-1]), err


def test_records_from_several_sdk_processes_land_exactly_once_with_their_attributes(server):
    processes, count = 4, 2000
    # Half of them compress their exports with gzip, as the Collector does.
    procs = [producer(server, f"otel-p{i}", count, *(["--gzip"] if i % 2 else [])) for i in range(processes)]
    results = [finish(p)[0] for p in procs]
    server.stop()
    for r in results:
        print(f"OTLP SDK process {r['session']}: {r['emitted']} records exported in {r['ok_calls']} calls, "
              f"{r['seconds']:.2f} s ({r['emitted'] / r['seconds']:.0f} records/s, {processes} processes at once)")
        assert r["flushed"] and r["failed_calls"] == 0 and r["ok_records"] == count, r
    found = 0
    for i in range(processes):
        session = f"otel-p{i}"
        lines = server.lines(session)
        found += len(lines)
        ns = collections.Counter(l["metadata"]["attributes"]["n"] for l in lines)
        assert len(lines) == count and set(ns) == set(range(1, count + 1)), \
            f"{session}: {len(lines)} lines, {len(ns)} distinct n; every record must land exactly once"
        assert [l["seq"] for l in lines] == list(range(1, count + 1)), "server-assigned seqs, no gaps"
        first = next(l for l in lines if l["metadata"]["attributes"]["n"] == 1)
        assert first["content"] == f"record 1 of {session}"
        assert first["role"] == "WARN", first  # the SDK's severity text for logging.WARNING
        assert first["metadata"]["attributes"]["producer"] == session
        assert first["metadata"]["resource"]["session.id"] == session
        assert first["metadata"]["resource"]["service.name"] == "otlp-producer"
        assert first["metadata"]["scope"]["name"] == "otlp-producer"
        assert first["metadata"]["severity_number"] == 13  # WARN
    print(f"OTLP: {processes * count} records exported, {found} found")


def test_one_sdk_process_export_throughput(server):
    """One SDK process alone, as fast as it logs: records/s to durable acks."""
    count = 20000
    r, _ = finish(producer(server, "otel-solo", count))
    server.stop()
    assert r["flushed"] and r["ok_records"] == count, r
    assert len(server.lines("otel-solo")) == count
    print(f"OTLP SDK throughput: one process, {count} records in {r['seconds']:.2f} s = "
          f"{count / r['seconds']:.0f} records/s ({r['ok_calls']} export calls)")


def wait_for_lines(path, at_least, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().count("\n") >= at_least:
            return
        assert proc.poll() is None, "the producer ended before the kill"
        time.sleep(0.01)
    raise AssertionError(f"fewer than {at_least} records confirmed within {timeout} s")


def test_a_kill_9_mid_export_loses_no_record_the_exporter_saw_succeed(server, tmp_path):
    count = 30000
    confirmed = tmp_path / "confirmed"
    # logd.seq numbers the records, so the exporter's retry of the export
    # that was in flight at the kill (durable or not) is kept exactly once.
    proc = producer(server, "otel-kill", count, "--seq", "--confirmed", str(confirmed), "--timeout", "60",
                    "--pace-every", "200")
    wait_for_lines(confirmed, 3000, proc)
    server.kill9()
    at_kill = confirmed.read_text().count("\n")
    server.start()
    r, stderr = finish(proc, timeout=180)
    with grpc.insecure_channel(server.target) as ch:
        # Records of the export in flight at the kill that were durable
        # before it: its retry brought them again, dropped by their seq.
        dropped = admin_pb2_grpc.AdminServiceStub(ch).GetStats(admin_pb2.StatsRequest()).frames_duplicate
    server.stop()
    ok = [int(x) for x in confirmed.read_text().split()]
    lines = server.lines("otel-kill")
    found = collections.Counter(l["metadata"]["attributes"]["n"] for l in lines)
    seqs = collections.Counter(l["seq"] for l in lines)
    retried = stderr.count("Transient error")
    print(f"OTLP kill -9: {count} records logged, {at_kill} confirmed at the kill, {len(ok)} confirmed in all "
          f"({r['failed_calls']} export calls failed for good, {retried} retries after transient errors), "
          f"{dropped} resent records dropped as duplicates after the restart, "
          f"{len(lines)} lines found, {sum(1 for c in found.values() if c > 1)} records found twice")
    assert at_kill < count and len(ok) > at_kill, "the kill came in the middle and the exports went on after it"
    assert len(ok) == len(set(ok)), "the exporter confirmed each record once"
    missing = [n for n in ok if found[n] == 0]
    doubled = [n for n in ok if found[n] > 1]
    assert not missing, f"{len(missing)} confirmed records lost, e.g. {missing[:5]}"
    assert not doubled, f"{len(doubled)} confirmed records found twice, e.g. {doubled[:5]}"
    assert all(c == 1 for c in seqs.values()), "no seq twice"
    assert all(l["seq"] == l["metadata"]["attributes"]["n"] for l in lines), "logd.seq became the seq"
