#!/usr/bin/env bash
# bench/run.sh: logd's peer benchmark (issue 6) in one command.
#
# Builds what it needs (release logd, the C helpers), installs redis-server /
# redis-tools with apt-get if they are missing, then on loopback, each system
# in a temp directory of its own:
#   - the disk's limit: write+fdatasync loops (4 KiB, 64 KiB), dd conv=fdatasync
#   - the old design: N forked writers appending under fcntl locks (bench/fcntl_writers.c)
#   - Redis Streams: redis-server appendonly (appendfsync always / everysec) + redis-benchmark XADD
#   - logd: release `logd serve` driven by `logd bench --json`
# and prints one markdown table (medians of the runs, min–max, ops per fsync,
# latency, server CPU, peak RSS) followed by the ratios of issue 6 and the
# targets of issue 14. Everything it started is stopped on exit (also on error
# or Ctrl-C).
#
# Usage: bench/run.sh [--quick] [--runs N] [--no-build] [--filter REGEX] [--out DIR]
# See bench/README.md.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
COMMAND_LINE="bench/run.sh${*:+ $*}"

usage() {
    cat <<'EOF'
usage: bench/run.sh [options]
  --quick          smoke run: short durations, 1 run per row (~3 min)
  --runs N         runs per row (default 3; --quick: 1)
  --no-build       do not run cargo; use LOGD_BIN or target/release/logd as is
  --filter REGEX   only rows whose id matches (ids: disk-*, fcntl-*, redis-*, logd-*)
  --out DIR        where results go (default bench/out)
environment:
  LOGD_BIN         logd binary to use (implies nothing about building; see --no-build)
  BENCH_TMPDIR     where the systems under test keep their files (default $TMPDIR or /tmp);
                   must be on the disk you want to measure (not tmpfs)
  BENCH_LOGD_SECS, BENCH_FCNTL_SECS, BENCH_DISK_SECS, BENCH_REDIS_SECS, BENCH_DD_MIB
                   override the per-run durations / sizes
  SLOW_FSYNC_US    delay the slow-disk shim adds to every fsync/fdatasync in the
                   *-slowfsync rows (default 1000; the *-slow10ms rows always use 10000)
EOF
}

QUICK=0
BUILD=1
RUNS=""
FILTER=""
OUT="$HERE/out"
while (($#)); do
    case "$1" in
        --quick) QUICK=1 ;;
        --runs) RUNS=${2:?--runs needs a number}; shift ;;
        --no-build) BUILD=0 ;;
        --filter) FILTER=${2:?--filter needs a regex}; shift ;;
        --out) OUT=${2:?--out needs a directory}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "run.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if ((QUICK)); then
    RUNS=${RUNS:-1}
    LOGD_SECS=${BENCH_LOGD_SECS:-2}
    FCNTL_SECS=${BENCH_FCNTL_SECS:-1}
    DISK_SECS=${BENCH_DISK_SECS:-1}
    REDIS_SECS=${BENCH_REDIS_SECS:-1}
    DD_MIB=${BENCH_DD_MIB:-256}
    REDIS_CAL_N=10000
    MODE=quick
else
    RUNS=${RUNS:-3}
    LOGD_SECS=${BENCH_LOGD_SECS:-8}
    FCNTL_SECS=${BENCH_FCNTL_SECS:-3}
    DISK_SECS=${BENCH_DISK_SECS:-3}
    REDIS_SECS=${BENCH_REDIS_SECS:-5}
    DD_MIB=${BENCH_DD_MIB:-1024}
    REDIS_CAL_N=30000
    MODE=full
fi
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --runs must be a positive integer" >&2; exit 2; }
SLOW_US=${SLOW_FSYNC_US:-1000}
# The *-slow10ms rows (issue 14, target 2): a slow network disk, whatever
# SLOW_FSYNC_US says.
SLOW10_US=10000
PAYLOAD_BYTES=256
# redis-benchmark's clients in the rows that do not name their own count.
REDIS_CLIENTS=50

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- prerequisites -------------------------------------------------------------

as_root() {
    if [[ $(id -u) == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null || die "missing $*, and no apt-get to install it with"
    log "installing $* with apt-get"
    if ((!APT_UPDATED)); then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

command -v python3 >/dev/null || apt_install python3
command -v cc >/dev/null || apt_install gcc libc6-dev
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null || ! command -v redis-cli >/dev/null; then
    apt_install redis-server redis-tools
fi
for c in setsid timeout dd awk stat; do
    command -v "$c" >/dev/null || die "missing $c"
done

mkdir -p "$OUT/bin"
BIN="$OUT/bin"
RAW="$OUT/raw.jsonl"
: >"$RAW"

if ((BUILD)); then
    command -v cargo >/dev/null || die "cargo not found (install Rust with rustup), or pass --no-build with LOGD_BIN"
    log "cargo build --release --bin logd (waits for cargo's lock if another build runs)"
    (cd "$ROOT" && cargo build --release --bin logd) >&2
fi
LOGD=${LOGD_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/logd}
[[ -x $LOGD ]] || die "no logd binary at $LOGD"

log "compiling the C helpers (cc -O2 -Wall)"
cc -O2 -Wall -o "$BIN/fcntl_writers" "$HERE/fcntl_writers.c"
cc -O2 -Wall -o "$BIN/disk_sync" "$HERE/disk_sync.c"
cc -O2 -Wall -shared -fPIC -o "$BIN/slow_fsync.so" "$HERE/slow_fsync.c" -ldl

# --- the temp directory and every process we start -------------------------------

WORK=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/logd-bench.XXXXXX")
PIDFILE="$WORK/pids"
: >"$PIDFILE"
FSTYPE=$(df -PT "$WORK" | awk 'NR == 2 { print $2 }')
FSDEV=$(df -P "$WORK" | awk 'NR == 2 { print $1 }')
if [[ $FSTYPE == tmpfs || $FSTYPE == ramfs ]]; then
    log "WARNING: $WORK is on $FSTYPE: fsync costs nothing there; set BENCH_TMPDIR to a directory on a real disk"
fi
CLK_TCK=$(getconf CLK_TCK)

# Fields of /proc/PID/stat after the ")" that ends the command name: index 0 is
# field 3 (state), so field k is index k-3.
proc_fields() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    echo "$s"
}
proc_start() {
    local f
    f=$(proc_fields "$1") || return 1
    read -ra f <<<"$f"
    echo "${f[19]}"
}
# alive PID START: the same process (not reused, not a zombie) still runs.
alive() {
    local f
    f=$(proc_fields "$1") || return 1
    read -ra f <<<"$f"
    [[ ${f[0]} != Z && ${f[19]} == "$2" ]]
}
# utime + stime + cutime + cstime of PID, in clock ticks.
cpu_ticks() {
    local f
    f=$(proc_fields "$1") || { echo 0; return; }
    read -ra f <<<"$f"
    echo $((f[11] + f[12] + f[13] + f[14]))
}
hwm_kb() {
    local v
    v=$(awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true)
    echo "${v:-null}"
}
load1() { cut -d' ' -f1 /proc/loadavg; }

# Starts "$@" in a session (and process group) of its own, stdout/stderr to
# files; sets SRV_PID (= its process group id) and registers it for cleanup.
# Without job control a background child is no group leader, so setsid execs
# in place and $! is the server itself.
start_bg() {
    local out=$1 err=$2
    shift 2
    # Created here: the child opens them only once it runs.
    : >"$out"
    : >"$err"
    setsid "$@" >>"$out" 2>>"$err" </dev/null &
    SRV_PID=$!
    echo "$SRV_PID $(proc_start "$SRV_PID")" >>"$PIDFILE"
}

# Signals a registered process group, falling back to the process alone.
signal_group() {
    kill "-$1" -- "-$2" 2>/dev/null || kill "-$1" "$2" 2>/dev/null || true
}

# stop_server PID [GRACE_SECONDS]: SIGTERM its group, wait, then SIGKILL.
stop_server() {
    local pid=$1 grace=${2:-30} start i
    start=$(awk -v p="$pid" '$1 == p { print $2 }' "$PIDFILE" | tail -1)
    signal_group TERM "$pid"
    for ((i = 0; i < grace * 10; i++)); do
        alive "$pid" "$start" || break
        sleep 0.1
    done
    if alive "$pid" "$start"; then
        log "pid $pid ignored SIGTERM for ${grace}s; SIGKILL"
        signal_group KILL "$pid"
    fi
    wait "$pid" 2>/dev/null || true
}

# Stops every registered process that still runs (after a failed step, and on exit).
kill_registered() {
    [[ -f $PIDFILE ]] || return 0
    local pid st i left
    local -a live=()
    while read -r pid st; do
        [[ -n $pid ]] || continue
        if alive "$pid" "$st"; then
            signal_group TERM "$pid"
            live+=("$pid:$st")
        fi
    done <"$PIDFILE"
    for ((i = 0; i < 100 && ${#live[@]}; i++)); do
        left=()
        for x in "${live[@]}"; do
            alive "${x%%:*}" "${x#*:}" && left+=("$x")
        done
        live=("${left[@]+"${left[@]}"}")
        ((${#live[@]})) && sleep 0.1
    done
    for x in "${live[@]+"${live[@]}"}"; do
        signal_group KILL "${x%%:*}"
    done
    : >"$PIDFILE"
}

# Every descendant of PID (depth first), from ps.
descendants() {
    local c
    for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$c"
        descendants "$c"
    done
}

STEP_PID=""
cleanup() {
    local rc=$? tree
    trap - EXIT INT TERM
    if [[ -n $STEP_PID ]]; then
        # The step in progress and the clients it runs (logd bench,
        # redis-benchmark, the C tools); its servers are registered below.
        tree=$(descendants "$STEP_PID")
        kill -TERM "$STEP_PID" $tree 2>/dev/null || true
    fi
    kill_registered
    [[ -n ${WORK:-} && -d $WORK ]] && rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- recording ------------------------------------------------------------------

# record ID SYSTEM WORKLOAD KIND RUN CPU_S RSS_KB LOAD1 EXTRA_JSON TOOL_JSON_FILE
record() {
    local tool
    tool=$(grep '^{' "${10}" | tail -1 || true)
    [[ -n $tool ]] || { log "no JSON in ${10}: $(tail -c 400 "${10}")"; return 1; }
    printf '{"id":"%s","system":"%s","workload":"%s","kind":"%s","run":%s,"cpu_s":%s,"rss_kb":%s,"load1":%s,"extra":%s,"tool":%s}\n' \
        "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$8" "$9" "$tool" >>"$RAW"
}

FAILED=()
# run_step ID SYSTEM WORKLOAD KIND FUNCTION ARGS...: runs FUNCTION ID SYSTEM
# WORKLOAD KIND ARGS... in a subshell with errexit; a failure is recorded
# and the run goes on with the next row.
run_step() {
    local id=$1 system=$2 workload=$3 kind=$4 fn=$5 rc
    shift 5
    if [[ -n $FILTER && ! $id =~ $FILTER ]]; then
        return 0
    fi
    log "── $id: $system, $workload"
    # In the background and waited for, so that a signal to this script is
    # handled at once (bash runs traps only between foreground commands).
    set +e
    (
        set -e
        "$fn" "$id" "$system" "$workload" "$kind" "$@"
    ) &
    STEP_PID=$!
    wait "$STEP_PID"
    rc=$?
    STEP_PID=""
    set -e
    kill_registered
    if ((rc)); then
        log "!! $id failed (exit $rc)"
        FAILED+=("$id")
        printf '{"id":"%s","system":"%s","workload":"%s","kind":"%s","error":"exit %s"}\n' \
            "$id" "$system" "$workload" "$kind" "$rc" >>"$RAW"
    fi
}

cpu_seconds() { awk -v a="$1" -v b="$2" -v t="$CLK_TCK" 'BEGIN { printf "%.3f", (b - a) / t }'; }

# --- the disk --------------------------------------------------------------------

disk_sync_step() { # ID SYSTEM WORKLOAD KIND BYTES MODE [shim]
    local id=$1 system=$2 workload=$3 kind=$4 bytes=$5 mode=$6 shim=${7:-} run d extra
    local -a flags=(-b "$bytes" -d "$DISK_SECS")
    [[ $mode == overwrite ]] && flags+=(-o)
    for ((run = 1; run <= RUNS; run++)); do
        d="$WORK/$id-$run"
        mkdir -p "$d"
        local l
        l=$(load1)
        if [[ -n $shim ]]; then
            env LD_PRELOAD="$BIN/slow_fsync.so" SLOW_FSYNC_US="$SLOW_US" SLOW_FSYNC_COUNT_FILE="$d/shim" \
                "$BIN/disk_sync" "${flags[@]}" -f "$d/data" >"$d/out.json"
            extra="{\"shim_fsyncs\":$(cat "$d/shim"),\"slow_fsync_us\":$SLOW_US}"
        else
            "$BIN/disk_sync" "${flags[@]}" -f "$d/data" >"$d/out.json"
            extra="{}"
        fi
        record "$id" "$system" "$workload" "$kind" "$run" null null "$l" "$extra" "$d/out.json"
        rm -rf "$d"
    done
}

dd_step() { # ID SYSTEM WORKLOAD KIND
    local id=$1 system=$2 workload=$3 kind=$4 run d l bytes secs
    for ((run = 1; run <= RUNS; run++)); do
        d="$WORK/$id-$run"
        mkdir -p "$d"
        sync
        l=$(load1)
        LC_ALL=C dd if=/dev/zero of="$d/data" bs=1M count="$DD_MIB" conv=fdatasync 2>"$d/dd.err"
        read -r bytes secs < <(awk '/copied/ { for (i = 1; i <= NF; i++) if ($i == "copied,") s = $(i + 1); print $1, s }' "$d/dd.err") || true
        [[ -n ${bytes:-} && -n ${secs:-} ]] || { log "cannot parse dd: $(cat "$d/dd.err")"; return 1; }
        awk -v b="$bytes" -v s="$secs" 'BEGIN { printf "{\"bytes\":%d,\"seconds\":%s,\"mb_per_sec\":%.1f}\n", b, s, b / s / 1e6 }' >"$d/out.json"
        record "$id" "$system" "$workload" "$kind" "$run" null null "$l" "{\"bytes\":$bytes}" "$d/out.json"
        rm -rf "$d"
    done
}

# --- the old design ----------------------------------------------------------------

fcntl_step() { # ID SYSTEM WORKLOAD KIND WRITERS sync|nosync
    local id=$1 system=$2 workload=$3 kind=$4 n=$5 mode=$6 run d l
    local -a flags=(-n "$n" -d "$FCNTL_SECS" -b "$PAYLOAD_BYTES")
    [[ $mode == sync ]] && flags+=(-s)
    for ((run = 1; run <= RUNS; run++)); do
        d="$WORK/$id-$run"
        mkdir -p "$d"
        sync
        l=$(load1)
        "$BIN/fcntl_writers" "${flags[@]}" -f "$d/shared.log" >"$d/out.json"
        record "$id" "$system" "$workload" "$kind" "$run" null null "$l" "{}" "$d/out.json"
        rm -rf "$d"
    done
}

# --- Redis --------------------------------------------------------------------------

free_port() {
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# redis_start DIR POLICY [ENV...]: sets SRV_PID and REDIS_PORT. ENV (NAME=VALUE,
# e.g. the slow-fsync shim's LD_PRELOAD) goes to redis-server's environment;
# the shim, if preloaded, writes its count of delayed syncs to DIR/shim.
redis_start() {
    local dir=$1 policy=$2 try i
    shift 2
    mkdir -p "$dir"
    for ((try = 0; try < 3; try++)); do
        REDIS_PORT=$(free_port)
        start_bg "$dir/redis.out" "$dir/redis.err" env SLOW_FSYNC_COUNT_FILE="$dir/shim" "$@" \
            redis-server --port "$REDIS_PORT" --bind 127.0.0.1 \
            --protected-mode no --dir "$dir" --appendonly yes --appendfsync "$policy" --save '' \
            --daemonize no --logfile ''
        for ((i = 0; i < 200; i++)); do
            if [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; then
                return 0
            fi
            kill -0 "$SRV_PID" 2>/dev/null || break
            sleep 0.05
        done
        log "redis-server did not come up on port $REDIS_PORT: $(tail -3 "$dir/redis.out")"
        stop_server "$SRV_PID" 5
    done
    return 1
}

redis_bench() { # PORT REQUESTS PIPELINE CLIENTS OUT_CSV
    local value
    value=$(printf '%*s' "$PAYLOAD_BYTES" '' | tr ' ' v)
    timeout 600 redis-benchmark -h 127.0.0.1 -p "$1" -c "$4" -n "$2" -P "$3" --csv \
        XADD bench:stream '*' payload "$value" >"$5" 2>"$5.err"
}

redis_step() { # ID SYSTEM WORKLOAD KIND POLICY PIPELINE [CLIENTS [ENV...]]
    local id=$1 system=$2 workload=$3 kind=$4 policy=$5 pipeline=$6 clients=${7:-$REDIS_CLIENTS}
    shift $(($# < 7 ? $# : 7))
    local run d l n c0 c1 rss rps extra slow=$SLOW_US a
    for a in "$@"; do
        if [[ $a == SLOW_FSYNC_US=* ]]; then slow=${a#*=}; fi
    done
    # Calibrate on a throwaway server: requests per run = REDIS_SECS at its rate.
    d="$WORK/$id-cal"
    redis_start "$d" "$policy" "$@"
    redis_bench "$REDIS_PORT" "$REDIS_CAL_N" "$pipeline" "$clients" "$d/cal.csv"
    stop_server "$SRV_PID"
    rps=$(python3 "$HERE/report.py" redis-csv "$d/cal.csv" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rps"])')
    n=$(awk -v r="$rps" -v s="$REDIS_SECS" 'BEGIN { n = int(r * s / 1000) * 1000; if (n < 10000) n = 10000; print n }')
    rm -rf "$d"
    for ((run = 1; run <= RUNS; run++)); do
        d="$WORK/$id-$run"
        redis_start "$d" "$policy" "$@"
        sync
        l=$(load1)
        c0=$(cpu_ticks "$SRV_PID")
        redis_bench "$REDIS_PORT" "$n" "$pipeline" "$clients" "$d/bench.csv"
        c1=$(cpu_ticks "$SRV_PID")
        rss=$(hwm_kb "$SRV_PID")
        stop_server "$SRV_PID"
        python3 "$HERE/report.py" redis-csv "$d/bench.csv" >"$d/out.json"
        extra="{\"requests\":$n,\"payload_bytes\":$PAYLOAD_BYTES,\"pipeline\":$pipeline,\"clients\":$clients,\"appendfsync\":\"$policy\""
        # The shim's count covers the whole server life (start, the run,
        # shutdown): a few syncs more than the run's own.
        [[ -s $d/shim ]] && extra+=",\"shim_fsyncs\":$(cat "$d/shim"),\"slow_fsync_us\":$slow"
        extra+="}"
        record "$id" "$system" "$workload" "$kind" "$run" "$(cpu_seconds "$c0" "$c1")" "$rss" "$l" "$extra" "$d/out.json"
        rm -rf "$d"
    done
}

# --- logd ------------------------------------------------------------------------------

# logd_start DIR ENV...: release `logd serve` on a free port with a fresh LOG_DIR;
# sets SRV_PID and LOGD_ADDR.
logd_start() {
    local dir=$1 i
    shift
    mkdir -p "$dir/logs"
    start_bg "$dir/serve.out" "$dir/serve.err" env LOG_DIR="$dir/logs" LOGD_LISTEN=127.0.0.1:0 \
        LOGD_METRICS_LISTEN=off LOG_COMPRESSION=none SLOW_FSYNC_COUNT_FILE="$dir/shim" "$@" "$LOGD" serve
    for ((i = 0; i < 600; i++)); do
        LOGD_ADDR=$(sed -n 's/^logd: listening on //p' "$dir/serve.out" | head -1)
        [[ -n $LOGD_ADDR ]] && return 0
        kill -0 "$SRV_PID" 2>/dev/null || break
        sleep 0.05
    done
    log "logd serve did not start: $(tail -5 "$dir/serve.err")"
    return 1
}

# Waits until the server's CPU use settles (materialization after the last
# ack), at most ~10 s, so the CPU figure covers the whole data path.
settle_cpu() {
    local pid=$1 a b i
    for ((i = 0; i < 30; i++)); do
        a=$(cpu_ticks "$pid")
        sleep 0.3
        b=$(cpu_ticks "$pid")
        ((b - a <= 2)) && break
    done
    return 0
}

# logd_step ID SYSTEM WORKLOAD KIND STREAMS SESSIONS FRAME_BYTES RPC RATE [ARG...]:
# each ARG that starts with -- goes to `logd bench` (one word per flag, e.g.
# --window-frames=1), every other one (NAME=VALUE) to the server's environment.
logd_step() {
    local id=$1 system=$2 workload=$3 kind=$4 streams=$5 sessions=$6 frame=$7 rpc=$8 rate=$9
    shift 9
    local run d l c0 c1 rss rot gz extra shim slow=$SLOW_US a
    local -a rate_flag=() bench_flags=() server_env=()
    for a in "$@"; do
        case $a in
            --*) bench_flags+=("$a") ;;
            *) server_env+=("$a") ;;
        esac
        if [[ $a == SLOW_FSYNC_US=* ]]; then slow=${a#*=}; fi
    done
    if [[ $rate == @half ]]; then
        rate=$(python3 "$HERE/report.py" median "$RAW" logd-256-s16x64-bidi ops_per_sec)
        rate=$(awk -v r="$rate" 'BEGIN { printf "%d", r / 2 }')
        log "   half of the measured 16/64 bidi maximum: --rate $rate"
    fi
    [[ $rate != 0 ]] && rate_flag=(--rate "$rate")
    for ((run = 1; run <= RUNS; run++)); do
        d="$WORK/$id-$run"
        logd_start "$d" "${server_env[@]+"${server_env[@]}"}"
        sync
        l=$(load1)
        c0=$(cpu_ticks "$SRV_PID")
        timeout $((LOGD_SECS * 4 + 120)) "$LOGD" bench --target "http://$LOGD_ADDR" --streams "$streams" \
            --sessions "$sessions" --frame-bytes "$frame" --duration "$LOGD_SECS" --rpc "$rpc" \
            --batch-frames 256 "${rate_flag[@]+"${rate_flag[@]}"}" "${bench_flags[@]+"${bench_flags[@]}"}" \
            --json >"$d/bench.json" 2>"$d/bench.err" ||
            { log "logd bench failed: $(tail -5 "$d/bench.err")"; return 1; }
        settle_cpu "$SRV_PID"
        c1=$(cpu_ticks "$SRV_PID")
        rss=$(hwm_kb "$SRV_PID")
        stop_server "$SRV_PID" 60
        rot=$(find "$d/logs" -maxdepth 1 \( -name '*.log' -o -name '*.log.gz' \) | wc -l)
        gz=$(find "$d/logs" -maxdepth 1 -name '*.log.gz' | wc -l)
        extra="{\"rotated_files\":$rot,\"gz_files\":$gz"
        [[ $rate != 0 ]] && extra+=",\"rate\":$rate"
        if [[ -s $d/shim ]]; then
            shim=$(cat "$d/shim")
            extra+=",\"shim_fsyncs\":$shim,\"slow_fsync_us\":$slow"
        fi
        extra+="}"
        record "$id" "$system" "$workload" "$kind" "$run" "$(cpu_seconds "$c0" "$c1")" "$rss" "$l" "$extra" "$d/bench.json"
        rm -rf "$d"
    done
}

# --- the run ------------------------------------------------------------------------------

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "mode $MODE: $RUNS run(s) per row; logd ${LOGD_SECS}s, fcntl ${FCNTL_SECS}s, disk ${DISK_SECS}s, redis ~${REDIS_SECS}s per run; files in $WORK ($FSTYPE on $FSDEV)"

D="disk"
run_step disk-sync-4k-append "$D" "write+fdatasync 4 KiB, appending" disk_sync disk_sync_step 4096 append
run_step disk-sync-64k-append "$D" "write+fdatasync 64 KiB, appending" disk_sync disk_sync_step 65536 append
run_step disk-sync-4k-overwrite "$D" "write+fdatasync 4 KiB, overwriting a preallocated file" disk_sync disk_sync_step 4096 overwrite
run_step disk-sync-64k-overwrite "$D" "write+fdatasync 64 KiB, overwriting a preallocated file" disk_sync disk_sync_step 65536 overwrite
run_step disk-sync-4k-overwrite-shim "$D" "write+fdatasync 4 KiB, overwriting, slow_fsync shim +${SLOW_US} µs" disk_sync disk_sync_step 4096 overwrite shim
run_step disk-dd "$D" "dd bs=1M count=$DD_MIB conv=fdatasync (sequential)" dd dd_step

O="old design (fcntl)"
run_step fcntl-n1-sync "$O" "1 writer, lock+write+fdatasync per 256 B line" fcntl fcntl_step 1 sync
run_step fcntl-n16-sync "$O" "16 writers, lock+write+fdatasync per 256 B line" fcntl fcntl_step 16 sync
run_step fcntl-n1-nosync "$O" "1 writer, lock+write per line, no fsync (not durable)" fcntl fcntl_step 1 nosync
run_step fcntl-n16-nosync "$O" "16 writers, lock+write per line, no fsync (not durable)" fcntl fcntl_step 16 nosync

R="Redis $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')"
C=$REDIS_CLIENTS
run_step redis-always-P16 "$R" "XADD 256 B, appendfsync always, $C clients, pipeline 16" redis redis_step always 16 "$C"
run_step redis-always-P1 "$R" "XADD 256 B, appendfsync always, $C clients, pipeline 1" redis redis_step always 1 "$C"
run_step redis-everysec-P16 "$R" "XADD 256 B, appendfsync everysec (not durable per op), $C clients, pipeline 16" redis redis_step everysec 16 "$C"
run_step redis-everysec-P1 "$R" "XADD 256 B, appendfsync everysec (not durable per op), $C clients, pipeline 1" redis redis_step everysec 1 "$C"
# Issue 14, targets 1 and 2: 64 single-request clients, as logd's 64 bidi
# streams with one frame in flight each; and the same on a slow disk.
run_step redis-always-c64-P1 "$R" "XADD 256 B, appendfsync always, 64 clients, pipeline 1" redis redis_step always 1 64
run_step redis-always-c64-P1-slow10ms "$R" "XADD 256 B, appendfsync always, 64 clients, pipeline 1, every fsync +${SLOW10_US} µs (LD_PRELOAD shim)" \
    redis redis_step always 1 64 LD_PRELOAD="$BIN/slow_fsync.so" SLOW_FSYNC_US="$SLOW10_US"

G="logd"
# The headline row first: the half-rate row derives its --rate from it.
for shape in "16 64" "1 1" "64 1000"; do
    read -r st se <<<"$shape"
    for rpc in bidi stream batch; do
        w="256 B, $st stream(s) / $se session(s), $rpc"
        [[ $rpc != bidi ]] && w+=" (256 frames per call)"
        run_step "logd-256-s${st}x${se}-$rpc" "$G" "$w" logd logd_step "$st" "$se" 256 "$rpc" 0
    done
done
run_step logd-4k-s16x64-bidi "$G" "4 KiB, 16 streams / 64 sessions, bidi" logd logd_step 16 64 4096 bidi 0
run_step logd-256-s16x64-bidi-halfrate "$G" "256 B, 16/64 bidi at half the measured max rate (latency)" logd logd_step 16 64 256 bidi @half
run_step logd-256-s16x64-bidi-slowfsync "$G" "256 B, 16/64 bidi, every fsync +${SLOW_US} µs (LD_PRELOAD shim)" logd logd_step 16 64 256 bidi 0 \
    LD_PRELOAD="$BIN/slow_fsync.so" SLOW_FSYNC_US="$SLOW_US"
# Issue 14, targets 1 and 2: 64 writers with one frame in flight each (vs
# redis-always-c64-P1*), on the disk as it is and with every fsync +10 ms.
run_step logd-256-s64x64-bidi-w1 "$G" "256 B, 64 streams / 64 sessions, bidi, 1 frame in flight per stream" logd logd_step 64 64 256 bidi 0 \
    --window-frames=1
run_step logd-256-s64x64-bidi-w1-slow10ms "$G" "256 B, 64/64 bidi, 1 frame in flight per stream, every fsync +${SLOW10_US} µs (LD_PRELOAD shim)" \
    logd logd_step 64 64 256 bidi 0 --window-frames=1 LD_PRELOAD="$BIN/slow_fsync.so" SLOW_FSYNC_US="$SLOW10_US"
ROT=$((1 << 20))
run_step logd-256-s16x64-bidi-rot-none "$G" "256 B, 16/64 bidi, rotating at 1 MiB, LOG_COMPRESSION=none" logd logd_step 16 64 256 bidi 0 \
    LOG_MAX_SIZE_BYTES=$ROT LOG_COMPRESSION=none
run_step logd-256-s16x64-bidi-rot-gzip "$G" "256 B, 16/64 bidi, rotating at 1 MiB, LOG_COMPRESSION=gzip" logd logd_step 16 64 256 bidi 0 \
    LOG_MAX_SIZE_BYTES=$ROT LOG_COMPRESSION=gzip

# --- the report ------------------------------------------------------------------------------

ELAPSED=$SECONDS
export META_DATE META_MODE META_RUNS META_CMD META_ELAPSED META_FS META_DEV META_LOAD0 META_LOAD1 META_LOGD META_REV \
    META_LOGD_SECS META_FCNTL_SECS META_DISK_SECS META_REDIS_SECS META_DD_MIB META_SLOW_US META_FAILED
META_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
META_MODE=$MODE
META_RUNS=$RUNS
META_CMD=$COMMAND_LINE
META_ELAPSED=$ELAPSED
META_FS=$FSTYPE
META_DEV=$FSDEV
META_LOAD0=$LOAD_START
META_LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
META_LOGD=$LOGD
META_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain -- src wal recovery Cargo.toml Cargo.lock build.rs proto 2>/dev/null) ]]; then
    META_REV+=" (+ uncommitted changes)"
fi
META_LOGD_SECS=$LOGD_SECS
META_FCNTL_SECS=$FCNTL_SECS
META_DISK_SECS=$DISK_SECS
META_REDIS_SECS=$REDIS_SECS
META_DD_MIB=$DD_MIB
META_SLOW_US=$SLOW_US
META_FAILED="${FAILED[*]+"${FAILED[*]}"}"
python3 - "$OUT/meta.json" <<'EOF'
import json, os, platform, subprocess, sys
e = os.environ
def sh(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""
cpu = ""
with open("/proc/cpuinfo") as f:
    for line in f:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
mem = ""
with open("/proc/meminfo") as f:
    mem = f.readline().split(":", 1)[1].strip()
meta = {
    "date": e["META_DATE"], "mode": e["META_MODE"], "runs": int(e["META_RUNS"]), "command": e["META_CMD"],
    "elapsed_seconds": int(e["META_ELAPSED"]), "cpu": cpu, "nproc": os.cpu_count(), "mem_total": mem,
    "kernel": platform.release(), "fs": f'{e["META_FS"]} on {e["META_DEV"]}',
    "loadavg_start": e["META_LOAD0"], "loadavg_end": e["META_LOAD1"],
    "logd_binary": e["META_LOGD"], "logd_rev": e["META_REV"],
    "redis_version": sh("redis-server", "--version"), "cc": sh("cc", "--version").splitlines()[0] if sh("cc", "--version") else "",
    "durations": {"logd_s": float(e["META_LOGD_SECS"]), "fcntl_s": float(e["META_FCNTL_SECS"]),
                  "disk_sync_s": float(e["META_DISK_SECS"]), "redis_target_s": float(e["META_REDIS_SECS"]),
                  "dd_mib": int(e["META_DD_MIB"])},
    "slow_fsync_us": int(e["META_SLOW_US"]),
    "failed": e["META_FAILED"].split(),
}
with open(sys.argv[1], "w") as f:
    json.dump(meta, f, indent=1)
EOF

echo
python3 "$HERE/report.py" report "$RAW" "$OUT/meta.json" "$OUT"
log "results: $OUT/results.json, $OUT/results.md (raw runs: $RAW); took $((ELAPSED / 60))m$((ELAPSED % 60))s"
if ((${#FAILED[@]})); then
    log "failed rows: ${FAILED[*]}"
    exit 1
fi
