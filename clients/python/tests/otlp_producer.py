"""One OpenTelemetry SDK process exporting logs to logd over OTLP/gRPC, run
as a subprocess by test_otlp.py: Python `logging` → `LoggingHandler` →
`BatchLogRecordProcessor` → `OTLPLogExporter`, all the SDK's own classes.

The exporter is the SDK's, subclassed only to write down, after each export
call it saw succeed, the `n` of every record in it (one per line, to
`--confirmed`), so the test knows exactly which records the exporter was
told are durable. Prints one JSON line of counts and timings at the end.
"""

import argparse
import json
import logging
import os
import time

import grpc
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, LogRecordExportResult
from opentelemetry.sdk.resources import Resource


class ConfirmingExporter(OTLPLogExporter):
    """The SDK's OTLP/gRPC exporter, noting which records it saw exported."""

    def __init__(self, confirmed_path, **kwargs):
        super().__init__(**kwargs)
        self.confirmed = open(confirmed_path, "a", buffering=1) if confirmed_path else None
        self.ok_calls = 0
        self.failed_calls = 0
        self.ok_records = 0

    def export(self, batch):
        result = super().export(batch)
        if result == LogRecordExportResult.SUCCESS:
            self.ok_calls += 1
            self.ok_records += len(batch)
            if self.confirmed:
                self.confirmed.write("".join(f"{r.log_record.attributes['n']}\n" for r in batch))
        else:
            self.failed_calls += 1
        return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True, help="host:port of logd")
    p.add_argument("--session", required=True, help="the session.id resource attribute")
    p.add_argument("--count", type=int, required=True, help="records to log")
    p.add_argument("--seq", action="store_true", help="number the records with the logd.seq attribute")
    p.add_argument("--confirmed", help="file to append the n of every record exported successfully")
    p.add_argument("--timeout", type=float, default=10, help="exporter timeout per export, retries included (s)")
    p.add_argument("--gzip", action="store_true", help="compress exports with gzip (the Collector's default)")
    p.add_argument("--pace-every", type=int, default=0, help="sleep 1 ms after every this many records (0: never)")
    args = p.parse_args()

    resource = Resource.create({
        "service.name": "otlp-producer",
        "service.instance.id": f"pid-{os.getpid()}",
        "session.id": args.session,
    })
    compression = grpc.Compression.Gzip if args.gzip else grpc.Compression.NoCompression
    exporter = ConfirmingExporter(args.confirmed, endpoint=args.endpoint, insecure=True, timeout=args.timeout,
                                  compression=compression)
    provider = LoggerProvider(resource=resource)
    # A queue that holds every record: the SDK drops records when its queue
    # is full, and this test counts every one.
    provider.add_log_record_processor(
        BatchLogRecordProcessor(exporter, max_queue_size=args.count + 1, max_export_batch_size=512,
                                schedule_delay_millis=50))
    log = logging.getLogger("otlp-producer")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(LoggingHandler(level=logging.INFO, logger_provider=provider))

    start = time.perf_counter()
    for n in range(1, args.count + 1):
        extra = {"n": n, "producer": args.session}
        if args.seq:
            extra["logd.seq"] = n
        log.warning("record %d of %s", n, args.session, extra=extra)
        if args.pace_every and n % args.pace_every == 0:
            time.sleep(0.001)
    flushed = provider.force_flush(timeout_millis=int(args.timeout * 1000 * 4))
    seconds = time.perf_counter() - start
    provider.shutdown()
    print(json.dumps({
        "session": args.session, "emitted": args.count, "flushed": flushed, "seconds": seconds,
        "ok_calls": exporter.ok_calls, "failed_calls": exporter.failed_calls, "ok_records": exporter.ok_records,
    }), flush=True)


if __name__ == "__main__":
    main()
