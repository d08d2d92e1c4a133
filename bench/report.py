#!/usr/bin/env python3
"""Helpers of bench/run.sh (standard library only).

  report.py redis-csv FILE            redis-benchmark --csv output -> one JSON object
  report.py median RAW ID FIELD       median of FIELD over the runs of workload ID
  report.py report RAW META OUTDIR    the table (markdown, stdout) + OUTDIR/results.{json,md}

RAW is the JSON-lines file run.sh appends one record to per run:
  {"id", "system", "workload", "kind", "run", "cpu_s", "rss_kb", "load1",
   "extra": {...}, "tool": {...the tool's own JSON...}}
or, for a workload that failed, {"id", "system", "workload", "kind", "error"}.
"""

import csv
import json
import statistics
import sys


def die(msg):
    print(f"report.py: {msg}", file=sys.stderr)
    sys.exit(2)


def load_raw(path):
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                die(f"{path}:{n}: {e}")
    return records


# --- normalization ---------------------------------------------------------


def normalize(rec):
    """One run -> ops, ops/s, MB/s, ops per fsync, latencies, CPU s, RSS KiB (None: n/a)."""
    t = rec.get("tool") or {}
    e = rec.get("extra") or {}
    kind = rec["kind"]
    out = {"ops": None, "ops_per_sec": None, "mb_per_sec": None, "ops_per_fsync": None, "p50_ms": None,
           "p99_ms": None, "p999_ms": None, "cpu_s": rec.get("cpu_s"), "rss_kb": rec.get("rss_kb"),
           "self_cpu_us_per_op": None}
    if kind == "logd":
        out.update(ops=t["frames_acked"], ops_per_sec=t["frames_per_sec"], mb_per_sec=t["mb_per_sec"],
                   p50_ms=t["p50_ms"], p99_ms=t["p99_ms"], p999_ms=t["p999_ms"],
                   # WAL fdatasyncs from the server's stats (older logd: server_commits, the same count).
                   ops_per_fsync=t["frames_per_fsync"] if "frames_per_fsync" in t
                   else t["frames_acked"] / t["server_commits"] if t.get("server_commits") else None,
                   self_cpu_us_per_op=t.get("server_cpu_us_per_frame"))
    elif kind in ("fcntl", "disk_sync"):
        out.update(ops=t["ops"], ops_per_sec=t["ops_per_sec"], mb_per_sec=t["mb_per_sec"],
                   p50_ms=t["p50_ms"], p99_ms=t["p99_ms"], p999_ms=t["p999_ms"])
        if kind == "fcntl":
            out.update(cpu_s=t["cpu_seconds"], rss_kb=t["max_rss_kb"])
    elif kind == "redis":
        ops = rec["extra"]["requests"]
        out.update(ops=ops, ops_per_sec=t["rps"], mb_per_sec=t["rps"] * rec["extra"]["payload_bytes"] / 1e6,
                   p50_ms=t.get("p50_ms"), p99_ms=t.get("p99_ms"))
        if e.get("shim_fsyncs"):
            # The shim counts every fsync of the server's life (a few besides the run's).
            out.update(ops_per_fsync=ops / e["shim_fsyncs"])
    elif kind == "dd":
        out.update(ops=None, ops_per_sec=None, mb_per_sec=t["mb_per_sec"])
    else:
        die(f"unknown kind {kind}")
    return out


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(records):
    """Records -> rows in first-seen order, with medians over runs."""
    order, by_id = [], {}
    for r in records:
        if r["id"] not in by_id:
            order.append(r["id"])
            by_id[r["id"]] = []
        by_id[r["id"]].append(r)
    rows = []
    for wid in order:
        recs = by_id[wid]
        first = recs[0]
        row = {"id": wid, "system": first["system"], "workload": first["workload"], "kind": first["kind"]}
        errors = [r["error"] for r in recs if "error" in r]
        runs = [r for r in recs if "error" not in r]
        row["runs"] = len(runs)
        if errors:
            row["errors"] = errors
        norm = [normalize(r) for r in runs]
        ops_s = [n["ops_per_sec"] for n in norm if n["ops_per_sec"] is not None]
        mbs = [n["mb_per_sec"] for n in norm if n["mb_per_sec"] is not None]
        row["ops_per_sec"] = {"median": med(ops_s), "min": min(ops_s) if ops_s else None,
                              "max": max(ops_s) if ops_s else None, "runs": ops_s}
        row["mb_per_sec"] = {"median": med(mbs), "min": min(mbs) if mbs else None,
                             "max": max(mbs) if mbs else None}
        for q in ("p50_ms", "p99_ms", "p999_ms", "ops_per_fsync"):
            row[q] = med([n[q] for n in norm])
        # logd's own figure (GetStats' process CPU), next to the /proc one above.
        row["self_cpu_us_per_op"] = med([n["self_cpu_us_per_op"] for n in norm])
        per_m = [n["cpu_s"] / n["ops"] * 1e6 for n in norm
                 if n["cpu_s"] is not None and n["ops"]]
        row["cpu_s_per_million_ops"] = med(per_m)
        rss = [n["rss_kb"] for n in norm if n["rss_kb"] is not None]
        row["peak_rss_mib"] = max(rss) / 1024 if rss else None
        row["load1_at_start"] = [r.get("load1") for r in runs]
        row["notes"] = notes(first["kind"], runs)
        row["extra"] = [r.get("extra") for r in runs]
        row["tool"] = [r.get("tool") for r in runs]
        rows.append(row)
    return rows


def notes(kind, runs):
    if not runs:
        return "FAILED"
    parts = []
    tools = [r.get("tool") or {} for r in runs]
    extras = [r.get("extra") or {} for r in runs]
    if kind == "logd":
        w = med([t.get("window_frames") for t in tools])
        if w is not None and w != 1024:
            parts.append(f"window {w:.0f}")
        self_cpu = med([t.get("server_cpu_us_per_frame") for t in tools])
        if self_cpu is not None:
            parts.append(f"GetStats CPU {flat(self_cpu)} µs/frame")
        errs = sum(t.get("errors", 0) for t in tools)
        if errs:
            parts.append(f"{errs} client errors")
        if any("rate" in e for e in extras):
            parts.append(f"paced at {med([e.get('rate') for e in extras]):,.0f}/s")
        gz = [e.get("gz_files") for e in extras if e.get("gz_files") is not None]
        rot = [e.get("rotated_files") for e in extras if e.get("rotated_files") is not None]
        if rot:
            parts.append(f"{med(rot):.0f} rotated, {med(gz):.0f} .gz")
        fs = [e.get("shim_fsyncs") for e in extras if e.get("shim_fsyncs") is not None]
        if fs:
            parts.append(f"shim delayed {med(fs):,.0f} syncs")
    elif kind == "fcntl":
        if not all(t.get("file_ok") for t in tools):
            parts.append("FILE SIZE MISMATCH")
        parts.append("CPU/RSS: writers")
    elif kind == "redis":
        e = extras[0]
        parts.append(f"{e['requests']:,} req/run")
        fs = [x.get("shim_fsyncs") for x in extras if x.get("shim_fsyncs") is not None]
        if fs:
            parts.append(f"shim delayed {med(fs):,.0f} syncs")
        parts.append("no p999 from redis-benchmark")
    elif kind == "disk_sync":
        parts.append("ops = write+fdatasync")
        fs = [e.get("shim_fsyncs") for e in extras if e.get("shim_fsyncs") is not None]
        if fs:
            parts.append("with slow_fsync shim")
    elif kind == "dd":
        parts.append(f"{extras[0]['bytes'] >> 20} MiB")
    return ", ".join(parts)


# --- ratios and targets ----------------------------------------------------


def find(rows, wid):
    for r in rows:
        if r["id"] == wid and r["runs"]:
            return r
    return None


def ratio(rows, num, den, field="ops_per_sec"):
    a, b = find(rows, num), find(rows, den)
    if not a or not b:
        return None
    x, y = a[field]["median"], b[field]["median"]
    if x is None or not y:
        return None
    return x / y


def compute_ratios(rows):
    L = "logd-256-s16x64-bidi"
    spec = [
        # (name, numerator, denominator, field, target, comparison)
        ("logd 16/64 bidi ÷ Redis appendfsync always, pipeline 16", L, "redis-always-P16", "ops_per_sec", 2.0, ">="),
        ("logd 16/64 bidi ÷ Redis appendfsync always, pipeline 1", L, "redis-always-P1", "ops_per_sec", None, None),
        ("logd 16/64 bidi ÷ old design durable (fcntl+fdatasync, N=16)", L, "fcntl-n16-sync", "ops_per_sec", 30.0, ">="),
        ("logd 16/64 bidi ÷ old design unsynced (fcntl, N=16)", L, "fcntl-n16-nosync", "ops_per_sec", 0.6, ">="),
        ("logd 4 KiB MB/s ÷ disk sequential (dd conv=fdatasync) MB/s", "logd-4k-s16x64-bidi", "disk-dd", "mb_per_sec", None, None),
        ("slow disk (+1 ms per fsync) ÷ normal, 16/64 bidi", "logd-256-s16x64-bidi-slowfsync", L, "ops_per_sec", 0.8, ">="),
        ("compression gzip ÷ none (both rotating at the same size), 16/64 bidi", "logd-256-s16x64-bidi-rot-gzip",
         "logd-256-s16x64-bidi-rot-none", "ops_per_sec", 0.9, ">="),
    ]
    for rpc in ("bidi", "stream", "batch"):
        spec.append((f"1000 sessions ÷ 64 sessions, {rpc} (64/1000 vs 16/64 streams/sessions)",
                     f"logd-256-s64x1000-{rpc}", f"logd-256-s16x64-{rpc}", "ops_per_sec", 0.75, ">="))
    out = []
    for name, num, den, field, target, cmp in spec:
        v = ratio(rows, num, den, field)
        out.append({"name": name, "numerator": num, "denominator": den, "field": field, "value": v,
                    "target": target, "met": met(v, target, cmp)})
    return out


def met(v, target, cmp):
    if v is None or target is None:
        return None
    return v >= target if cmp == ">=" else v <= target


def compute_targets(rows):
    """The absolute targets of issue 6 that are not ratios."""
    out = []

    def add(name, value, target, cmp, unit):
        out.append({"name": name, "value": value, "target": target, "unit": unit,
                    "met": met(value, target, cmp), "cmp": cmp})

    r = find(rows, "logd-256-s16x64-bidi")
    add("durable acked frames/s, 256 B, 16 bidi streams / 64 sessions", r and r["ops_per_sec"]["median"], 400000, ">=", "frames/s")
    add("server CPU per 256 B frame (16/64 bidi)", r and r["cpu_s_per_million_ops"], 2.5, "<=", "µs")
    r = find(rows, "logd-4k-s16x64-bidi")
    add("4 KiB frames, content acked", r and r["mb_per_sec"]["median"], 400, ">=", "MB/s")
    r = find(rows, "logd-256-s16x64-bidi-halfrate")
    add("ack p50 at half the max rate", r and r["p50_ms"], 0.5, "<=", "ms")
    add("ack p99 at half the max rate", r and r["p99_ms"], 2.0, "<=", "ms")
    add("ack p999 at half the max rate", r and r["p999_ms"], 10.0, "<=", "ms")
    r = find(rows, "logd-256-s64x1000-bidi")
    add("peak RSS, 64 streams / 1000 sessions (bidi)", r and r["peak_rss_mib"], 200, "<=", "MiB")
    return out


ISSUE14_W1 = "logd-256-s64x64-bidi-w1"
ISSUE14_REDIS_W1 = "redis-always-c64-P1"
ISSUE14_SLOW = "-slow10ms"


def compute_issue14(rows, meta):
    """Issue 14's targets, each measured side by side in this run."""
    out = []

    def add(target, name, value, goal, cmp, unit, rows_used):
        out.append({"target": target, "name": name, "value": value, "goal": goal, "cmp": cmp, "unit": unit,
                    "met": met(value, goal, cmp), "rows": rows_used})

    def field(wid, f):
        r = find(rows, wid)
        if not r:
            return None
        v = r[f]
        return v["median"] if isinstance(v, dict) else v

    def div(a, b):
        return None if a is None or not b else a / b

    deep, w1, rw1 = "logd-256-s16x64-bidi", ISSUE14_W1, ISSUE14_REDIS_W1
    slow, rslow = w1 + ISSUE14_SLOW, rw1 + ISSUE14_SLOW
    # 1. many single-frame writers
    add(1, f"{w1} ÷ {rw1} (frames/s ÷ req/s)", ratio(rows, w1, rw1), 2.0, ">=", "×", [w1, rw1])
    add(1, f"{w1}: acked frames per WAL fsync", field(w1, "ops_per_fsync"), 40, ">=", "", [w1])
    # 2. slow disks: the ideal is one fsync per shim delay covering every stream's frame
    r = find(rows, slow)
    us = streams = None
    if r:
        us = next((e.get("slow_fsync_us") for e in r["extra"] if e and e.get("slow_fsync_us")), None)
        streams = next((t.get("streams") for t in r["tool"] if t and t.get("streams")), None)
    ideal = streams * 1e6 / us if us and streams else None
    fsync_ms = us / 1000 if us else None
    add(2, f"{slow}: frames/s ÷ ideal ({fnum(ideal)}/s = {streams or '?'} frames per {fsync_ms or '?'} ms fsync)",
        div(field(slow, "ops_per_sec"), ideal), 0.8, ">=", "×", [slow])
    add(2, f"{slow}: ack p50 ÷ fsync delay", div(field(slow, "p50_ms"), fsync_ms), 2.0, "<=", "×", [slow])
    add(2, f"{slow}: ack p99 ÷ fsync delay", div(field(slow, "p99_ms"), fsync_ms), 3.0, "<=", "×", [slow])
    add(2, f"{slow}: acked frames per WAL fsync", field(slow, "ops_per_fsync"), None, None, "", [slow])
    add(2, f"{slow} ÷ {rslow}", ratio(rows, slow, rslow), None, None, "×", [slow, rslow])
    add(2, f"{deep}-slowfsync (+{meta.get('slow_fsync_us', '?')} µs per fsync) ÷ {deep}",
        ratio(rows, deep + "-slowfsync", deep), 0.95, ">=", "×", [deep + "-slowfsync", deep])
    # 3. latency under load
    half = deep + "-halfrate"
    for q, goal in (("p50", 1.0), ("p99", 5.0), ("p999", 20.0)):
        add(3, f"{half}: ack {q}", field(half, f"{q}_ms"), goal, "<=", "ms", [half])
    # 4. server CPU per frame (/proc/PID/stat of the server, the same measure for both)
    add(4, f"server CPU per op: {deep} ÷ redis-always-P16",
        div(field(deep, "cpu_s_per_million_ops"), field("redis-always-P16", "cpu_s_per_million_ops")),
        0.4, "<=", "×", [deep, "redis-always-P16"])
    add(4, f"server CPU per frame: {w1}", field(w1, "cpu_s_per_million_ops"), 10.0, "<=", "µs", [w1])
    # 5. many sessions
    many = "logd-256-s64x1000-bidi"
    add(5, f"{many} ÷ {deep}", ratio(rows, many, deep), 0.75, ">=", "×", [many, deep])
    add(5, f"{many}: server peak RSS", field(many, "peak_rss_mib"), 200, "<=", "MiB", [many])
    # 6. keep the gains
    add(6, f"{deep} ÷ redis-always-P16", ratio(rows, deep, "redis-always-P16"), 2.5, ">=", "×", [deep, "redis-always-P16"])
    return out


# --- formatting ------------------------------------------------------------


def fnum(v, digits=0):
    if v is None:
        return "—"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def flat(v):
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmb(v):
    if v is None:
        return "—"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def fratio(v):
    return "—" if v is None else f"{v:.2f}×" if v < 10 else f"{v:.1f}×"


def markdown(rows, ratios, targets, issue14, meta):
    lines = []
    lines.append(f"logd peer benchmark — {meta.get('date', '')} — {meta.get('mode', '')} run, "
                 f"{meta.get('runs', '?')} run(s) per row, host: {meta.get('cpu', '?')} × {meta.get('nproc', '?')}, "
                 f"kernel {meta.get('kernel', '?')}, fs {meta.get('fs', '?')}")
    lines.append("")
    lines.append("| # | system | workload | ops/s median (min–max) | MB/s | ops per fsync | p50 ms | p99 ms | p999 ms | server CPU s / M ops | peak RSS MiB | notes |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows, 1):
        o = r["ops_per_sec"]
        if o["median"] is None:
            ops = "—"
        elif r["runs"] > 1:
            ops = f"{fnum(o['median'])} ({fnum(o['min'])}–{fnum(o['max'])})"
        else:
            ops = fnum(o["median"])
        mb = r["mb_per_sec"]
        mbs = fmb(mb["median"])
        if r["kind"] == "dd" and r["runs"] > 1:
            mbs = f"{fmb(mb['median'])} ({fmb(mb['min'])}–{fmb(mb['max'])})"
        note = r["notes"]
        if r.get("errors"):
            note = (note + "; " if note else "") + f"{len(r['errors'])} failed run(s)"
        rss = None if r["peak_rss_mib"] is None else r["peak_rss_mib"]
        lines.append(f"| {i} | {r['system']} | {r['workload']} | {ops} | {mbs} | {flat(r['ops_per_fsync'])} | "
                     f"{flat(r['p50_ms'])} | "
                     f"{flat(r['p99_ms'])} | {flat(r['p999_ms'])} | {flat(r['cpu_s_per_million_ops'])} | "
                     f"{fnum(rss, 1) if rss is not None else '—'} | {note} |")
    lines.append("")
    lines.append("| ratio (medians) | value | issue 6 target | met? |")
    lines.append("|---|---|---|---|")
    for x in ratios:
        t = "—" if x["target"] is None else f"≥ {x['target']:g}×"
        m = "—" if x["met"] is None else ("yes" if x["met"] else "**no**")
        lines.append(f"| {x['name']} | {fratio(x['value'])} | {t} | {m} |")
    lines.append("")
    lines.append("| absolute target | measured | target | met? |")
    lines.append("|---|---|---|---|")
    for x in targets:
        v = x["value"]
        vs = "—" if v is None else (fnum(v) if v >= 100 else flat(v))
        m = "—" if x["met"] is None else ("yes" if x["met"] else "**no**")
        cmp = "≥" if x["cmp"] == ">=" else "≤"
        lines.append(f"| {x['name']} | {vs} {x['unit']} | {cmp} {x['target']:g} {x['unit']} | {m} |")
    lines.append("")
    lines.append("| issue 14 | measured | target | |")
    lines.append("|---|---|---|---|")
    for x in issue14:
        v, u = x["value"], x["unit"]
        if v is None:
            vs = "not measured"
        elif u == "×":
            vs = fratio(v)
        else:
            vs = f"{flat(v)}{' ' + u if u else ''}"
        if x["goal"] is None:
            t = "—"
        else:
            t = f"{'≥' if x['cmp'] == '>=' else '≤'} {x['goal']:g}{'×' if u == '×' else ' ' + u if u else ''}"
        m = "—" if x["met"] is None else ("PASS" if x["met"] else "**MISS**")
        lines.append(f"| {x['target']}. {x['name']} | {vs} | {t} | {m} |")
    lines.append("")
    if meta.get("elapsed_seconds") is not None:
        lines.append(f"Run time {meta['elapsed_seconds'] / 60:.1f} min; command: `{meta.get('command', '')}`; "
                     f"logd {meta.get('logd_rev', '?')}; {meta.get('redis_version', '')}; "
                     f"load average at start {meta.get('loadavg_start', '?')}, at end {meta.get('loadavg_end', '?')}.")
    return "\n".join(lines) + "\n"


# --- commands ---------------------------------------------------------------


def cmd_redis_csv(path):
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if len(rows) < 2 or rows[0][:2] != ["test", "rps"]:
        die(f"{path}: not redis-benchmark --csv output: {rows[:2]!r}")
    head, vals = rows[0], rows[-1]
    d = dict(zip(head, vals))
    out = {"rps": float(d["rps"])}
    for k_in, k_out in (("avg_latency_ms", "avg_ms"), ("p50_latency_ms", "p50_ms"),
                        ("p95_latency_ms", "p95_ms"), ("p99_latency_ms", "p99_ms"),
                        ("max_latency_ms", "max_ms")):
        if k_in in d:
            out[k_out] = float(d[k_in])
    print(json.dumps(out))


def cmd_median(raw, wid, field):
    vals = []
    for r in load_raw(raw):
        if r["id"] == wid and "error" not in r:
            v = normalize(r).get(field)
            if v is not None:
                vals.append(v)
    if not vals:
        die(f"no runs of {wid}")
    print(f"{statistics.median(vals):.1f}")


def cmd_report(raw, meta_path, outdir):
    with open(meta_path) as f:
        meta = json.load(f)
    rows = aggregate(load_raw(raw))
    ratios = compute_ratios(rows)
    targets = compute_targets(rows)
    issue14 = compute_issue14(rows, meta)
    md = markdown(rows, ratios, targets, issue14, meta)
    with open(f"{outdir}/results.json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "ratios": ratios, "targets": targets, "issue14": issue14}, f, indent=1)
        f.write("\n")
    with open(f"{outdir}/results.md", "w") as f:
        f.write(md)
    sys.stdout.write(md)


def main(argv):
    if len(argv) >= 2 and argv[1] == "redis-csv" and len(argv) == 3:
        cmd_redis_csv(argv[2])
    elif len(argv) >= 2 and argv[1] == "median" and len(argv) == 5:
        cmd_median(argv[2], argv[3], argv[4])
    elif len(argv) >= 2 and argv[1] == "report" and len(argv) == 5:
        cmd_report(argv[2], argv[3], argv[4])
    else:
        die(__doc__)


if __name__ == "__main__":
    main(sys.argv)
