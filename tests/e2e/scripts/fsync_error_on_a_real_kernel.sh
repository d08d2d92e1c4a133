#!/bin/bash
# The fsync-error class on a real Linux kernel: a loop-mounted ext4 (no
# journal) whose backing file lives on a small tmpfs that the test fills, so
# the kernel's writeback of new blocks fails (ENOSPC) for real, then frees.
#
# 1. logd acks a first batch; the backing fills; the next batch's WAL
#    fdatasync fails: logd must not ack it and must exit 1.
# 2. Space is back; logd restarts WITHOUT a remount: the page cache still
#    holds the failed pages (clean, never written again). A new batch is
#    acked, then logd is killed (SIGKILL, session files never synced).
# 3. "Power cut": the backing fills again so the remaining dirty pages fail
#    at unmount, the filesystem is unmounted (page cache gone) and mounted
#    again. logd starts, recovers and stops.
# Every acked line must be in the session file exactly once.
#
# Usage: fsync_error_on_a_real_kernel.sh LOGD_BIN WORKDIR (run under unshare -m).
# Exit 0: pass; 1: fail; 77: the environment cannot set it up (not root, no
# loop device, no ext4).
set -u
BIN=$1
W=$2
B=$W/backing
M=$W/mnt
LOGS=$M/logs
mkdir -p "$B" "$M"
LOOP=
Q=
MAXKB=
PID=

skip() { echo "SKIP: $*"; cleanup; exit 77; }
fail() { echo "FAIL: $*"; for f in "$W"/err.*; do echo "== $f"; tail -n 30 "$f"; done; cleanup; exit 1; }
cleanup() {
    [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    PID=
    mountpoint -q "$M" && umount "$M"
    # The limit outlives the attachment (the loop device stays): restore it.
    [ -n "$MAXKB" ] && echo "$MAXKB" >"$Q/max_sectors_kb" 2>/dev/null
    MAXKB=
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
    mountpoint -q "$B" && umount "$B"
}
fill() { dd if=/dev/zero of="$B/fill" bs=1M 2>/dev/null; sync "$B/fill" 2>/dev/null; true; }
unfill() { rm -f "$B/fill"; }

[ "$(id -u)" = 0 ] || skip "not root"
mount -t tmpfs -o size=64M tmpfs "$B" || skip "cannot mount a tmpfs"
truncate -s 256M "$B/disk.img"
# One I/O request = one aligned 4 KiB block = one tmpfs page, so a write
# either lands whole or fails whole. With larger requests the loop driver
# (buffered I/O through lo_rw_aio, Linux >= 6.15) completes a SHORT write to
# the full tmpfs (the first pages existed, the next needed a new page) as a
# success: the tail is dropped and fdatasync returns 0. A disk that loses
# data after a successful fdatasync is not the fault the test is about, and
# no WAL can survive it (see the commit that added these lines).
mkfs.ext4 -q -F -b 4096 -O ^has_journal "$B/disk.img" >/dev/null 2>&1 || skip "mkfs.ext4 failed"
LOOP=$(losetup -f --show -b 4096 "$B/disk.img" 2>/dev/null) || skip "no loop device with 4 KiB blocks"
Q=/sys/block/${LOOP#/dev/}/queue
MAXKB=$(cat "$Q/max_sectors_kb" 2>/dev/null)
echo 4 >"$Q/max_sectors_kb" 2>/dev/null && [ "$(cat "$Q/max_sectors_kb")" = 4 ] \
    || skip "cannot limit $LOOP to 4 KiB requests (short writes would be lost silently)"
mount -t ext4 "$LOOP" "$M" || skip "cannot mount ext4 on $LOOP"

N=0
start() {
    N=$((N + 1))
    LOG_DIR=$LOGS LOGD_LISTEN=127.0.0.1:0 LOGD_METRICS_LISTEN=off LOG_FLUSH_INTERVAL_MS=60000 \
        LOGD_DISK_FREE_MIN_PERCENT=0 LOGD_DISK_FREE_MIN_BYTES=0 RUST_LOG=info \
        "$BIN" serve >"$W/out.$N" 2>"$W/err.$N" &
    PID=$!
    for _ in $(seq 300); do
        ADDR=$(sed -n 's/^logd: listening on //p' "$W/out.$N")
        [ -n "$ADDR" ] && return 0
        kill -0 "$PID" 2>/dev/null || fail "logd run $N exited during start"
        sleep 0.1
    done
    fail "logd run $N did not start within 30 s"
}
# lines TAG COUNT BYTES: COUNT lines "TAG i" padded to BYTES.
lines() { for i in $(seq "$2"); do printf '%s %05d %s\n' "$1" "$i" "$(head -c "$3" /dev/zero | tr '\0' p)"; done; }
send() { "$BIN" send --session s --target "http://$ADDR" >>"$W/send.log" 2>&1; }

# 1. A first batch is acked; then the backing fills and a big batch fails.
start
lines first 50 100 | send || fail "the first batch was not acked"
fill
if lines failed 3000 1000 | send; then fail "a batch was acked although its fdatasync failed"; fi
for _ in $(seq 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$PID" 2>/dev/null && fail "logd still runs 10 s after a WAL fdatasync failed"
wait "$PID"; CODE=$?; PID=
[ "$CODE" = 1 ] || fail "logd exited with $CODE after a WAL fdatasync failed, expected 1"
grep -q "failed" "$W/err.1" || fail "no failure logged"

# 2. Space is back; restart without a remount (the page cache survives).
unfill
start
lines after 40 100 | send || fail "the batch after the restart was not acked"
kill -9 "$PID"; wait "$PID" 2>/dev/null; PID=

# 3. A power cut: unsynced dirty pages fail at unmount; the cache is gone.
fill
umount "$M" || fail "umount failed"
unfill
mount -t ext4 "$LOOP" "$M" || fail "remount failed"
start
kill -TERM "$PID"; wait "$PID"; CODE=$?; PID=
[ "$CODE" = 0 ] || fail "the last run exited with $CODE"

# Every acked line exactly once, in order.
got=$(cat "$LOGS"/s.*.log "$LOGS"/s.logtmp 2>/dev/null | sed -n 's/.*"content":"\(first [0-9]*\|after [0-9]*\) p*".*/\1/p')
want=$( (lines first 50 0; lines after 40 0) | sed 's/ $//')
if [ "$got" != "$want" ]; then
    diff <(echo "$want") <(echo "$got") | head -20
    fail "acked lines are missing or repeated"
fi
failed_lines=$(cat "$LOGS"/s.*.log "$LOGS"/s.logtmp 2>/dev/null | grep -c '"content":"failed ' || true)
echo "PASS (failed-batch lines materialized: $failed_lines, each at most once)"
dups=$(cat "$LOGS"/s.*.log "$LOGS"/s.logtmp 2>/dev/null | sed -n 's/.*"content":"\(failed [0-9]*\) .*/\1/p' | sort | uniq -d | wc -l)
[ "$dups" = 0 ] || fail "$dups failed-batch lines appear twice"
cleanup
exit 0
