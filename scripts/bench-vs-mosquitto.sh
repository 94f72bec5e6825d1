#!/usr/bin/env bash
# Herald vs Mosquitto, side by side on this machine (docs/benchmarks.md says what each case
# measures and how to read the results).
#
#   sudo apt-get install -y mosquitto      # once; the script never uses a system service
#   scripts/bench-vs-mosquitto.sh          # ~7 minutes after the release build
#
# It builds Herald and herald-bench in release, then for every case starts a fresh broker
# (Herald with a generated config, Mosquitto with its own config, each on a free loopback
# port with its data in a temp dir), runs herald-bench against it, and stops it. The two
# brokers alternate (H M H M ...) for ROUNDS rounds; the report takes medians, writes the
# results section of docs/benchmarks.md and the chart crates/bench/charts/benchmarks.svg.
#
# Knobs (environment): ROUNDS (3), CONN_PER_ROUND (3: conn-10k pairs per round; a run takes
# 2 s and its spread is the widest), DURATION (5 s of load per run), CONNECTIONS (10000),
# CURVES (1: also the 1k..18k connection and 1..1000 subscriber curves; 0: skip),
# BENCH_THREADS (1), KEEP (1: keep the temp dir with every log and the raw JSON lines),
# OUT (docs/benchmarks.md), RESULTS_ONLY (a results.jsonl to report again without running),
# HERALD_REV (the version named in the report; default: the git commit).

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
ROUNDS=${ROUNDS:-3}
CONN_PER_ROUND=${CONN_PER_ROUND:-3}
DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-10000}
CURVES=${CURVES:-1}
BENCH_THREADS=${BENCH_THREADS:-1}
OUT=${OUT:-docs/benchmarks.md}
SVG=crates/bench/charts/benchmarks.svg
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release

WORK=$(mktemp -d /tmp/herald-bench.XXXXXX)
RESULTS=$WORK/results.jsonl
# free_port, stop_broker, run_herald, run_mosquitto, mosquitto_user_line
source "$ROOT/scripts/lib/brokers.sh"

cleanup() {
    stop_broker
    if [[ "${KEEP:-0}" == 1 ]]; then
        echo "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }

# start_herald SYNC WITH_PRESENCE_RULE
start_herald() {
    local sync=$1 presence=$2 dir=$WORK/herald
    rm -rf "$dir"
    mkdir -p "$dir"
    cat >"$dir/herald.toml" <<EOF
[node]
id = "herald-bench"
data_dir = "$dir/data"

[listeners.tcp]
bind = "127.0.0.1:0"

[admin]
enabled = false

[instance]
id = "herald-bench"

[[access_keys]]
id = "bench"
secret = "bench-secret"
publish = ["bench/#"]
subscribe = ["bench/#", "\$notice/#"]

[[groups]]
id = "GID_bench"

[[topics]]
parent = "bench"

[limits]
max_inflight = 64
max_queued_messages = 10000
max_connections = 100000

[storage]
sync = "$sync"
interval_ms = 100
EOF
    if [[ "$presence" == 1 ]]; then
        cat >>"$dir/herald.toml" <<'EOF'

[[sinks]]
id = "notices"
type = "mqtt"
topic = "$notice/{groupId}/{clientId}/{eventType}"
qos = 1

[[rules]]
id = "status-to-notices"
kind = "status_notice"
source = { groups = ["GID_bench"], events = ["connect", "tcpclean"] }
sinks = ["notices"]
EOF
    fi
    run_herald "$dir/herald.toml" "$dir"
}

# start_mosquitto PERSISTENCE(true|false)
start_mosquitto() {
    local persistence=$1 dir=$WORK/mosquitto
    rm -rf "$dir"
    mkdir -p "$dir/data"
    PORT=$(free_port)
    {
        echo "listener $PORT 127.0.0.1"
        echo "allow_anonymous true"
        echo "max_inflight_messages 64"
        echo "max_queued_messages 10000"
        echo "persistence $persistence"
        echo "persistence_location $dir/data/"
        echo "log_dest file $WORK/mosquitto.log"
        echo "log_type error"
        echo "log_type warning"
        echo "connection_messages false"
        echo "set_tcp_nodelay true"
        mosquitto_user_line
    } >"$dir/mosquitto.conf"
    run_mosquitto "$dir/mosquitto.conf"
}

# run_case CASE BROKER SYNC PRESENCE -- herald-bench arguments...
run_case() {
    local case=$1 broker=$2 sync=$3 presence=$4
    shift 5
    local auth
    if [[ "$broker" == herald ]]; then
        start_herald "$sync" "$presence"
        auth=(--username-mode signature --access-key bench --secret bench-secret --instance herald-bench)
    else
        local persistence=false
        [[ "$case" == offline-* ]] && persistence=true
        start_mosquitto "$persistence"
        auth=(--username-mode none)
    fi
    local line
    line=$("$BIN/herald-bench" --port "$PORT" --broker-pid "$BROKER_PID" --group GID_bench \
        --topic-prefix bench --label "$broker" --case "$case" --threads "$BENCH_THREADS" \
        --max-duration 120 "${auth[@]}" "$@" 2>>"$WORK/bench.log") || true
    stop_broker
    echo "$line" >>"$RESULTS"
    log "$case $broker: $(echo "$line" | cut -c1-300)"
}

# compare CASE SYNC -- ARGS: one run on Herald, then one on Mosquitto.
compare() {
    local case=$1 sync=$2
    shift 3
    run_case "$case" herald "$sync" 0 -- "$@"
    run_case "$case" mosquitto "$sync" 0 -- "$@"
}

machine() {
    local model mem
    model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
    mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
    echo "nproc = $(nproc), ${model:-unknown CPU}, $mem RAM, Linux $(uname -r)"
}

report() {
    local rev
    rev=${HERALD_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
    if [[ -z "${HERALD_REV:-}" && -n "$(git status --porcelain -- crates 2>/dev/null)" ]]; then
        rev="$rev+changes"
    fi
    "$BIN/herald-bench-report" --input "$1" --output "$OUT" --svg "$SVG" \
        --svg-link "../$SVG" --rounds "$ROUNDS" --machine "$(machine)" \
        --date "$(date -u +%Y-%m-%d)" --herald-version "$rev (release build)" \
        --mosquitto-version "$(mosquitto -h 2>/dev/null | head -1 | sed 's/^mosquitto version //') (Debian package)"
    log "wrote $OUT and $SVG"
}

if ! command -v mosquitto >/dev/null; then
    echo "mosquitto is not installed: sudo apt-get install -y mosquitto" >&2
    exit 2
fi

if [[ -n "${RESULTS_ONLY:-}" ]]; then
    cargo build --release -q -p herald-bench --bin herald-bench-report
    report "$RESULTS_ONLY"
    exit 0
fi

log "building herald and herald-bench (release)"
cargo build --release -q -p herald -p herald-bench
# Every connection is a file descriptor in the bench and in the broker.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (($(ulimit -n) < CONNECTIONS + 500)); then
    echo "ulimit -n is $(ulimit -n): too low for CONNECTIONS=$CONNECTIONS" >&2
    exit 2
fi

log "machine: $(machine); results in $WORK"
for round in $(seq 1 "$ROUNDS"); do
    log "round $round of $ROUNDS"
    # 64 handshakes at once: Mosquitto 2.0 listens with a backlog of 100, and more make some
    # SYNs wait for a 1 s retransmission (docs/benchmarks.md).
    for _ in $(seq 1 "$CONN_PER_ROUND"); do
        compare conn-10k always -- --scenario conn --connections "$CONNECTIONS" --connect-concurrency 64
    done
    compare fanin-q0 always -- --scenario fanin --publishers 4 --qos 0 --payload 64 --duration "$DURATION"
    compare fanin-q1 always -- --scenario fanin --publishers 4 --qos 1 --payload 64 --duration "$DURATION"
    compare fanout-q0 always -- --scenario fanout --subscribers 100 --qos 0 --payload 64 --duration "$DURATION"
    compare latency-q1 always -- --scenario latency --rate 10000 --payload 64 --duration "$DURATION"
    compare offline-always always -- --scenario offline --subscribers 10 --publishers 4 --messages 5000
    compare offline-interval interval -- --scenario offline --subscribers 10 --publishers 4 --messages 5000
    # Presence is Herald's own: 2,600 connect/close cycles per second make 5,200 events per second.
    run_case presence herald always 1 -- --scenario presence --connections 50 --rate 2600 --duration "$DURATION"
done

if [[ "$CURVES" == 1 ]]; then
    log "curves (one round each)"
    for n in 1000 5000 10000 18000; do
        compare "curve-conn-$n" always -- --scenario conn --connections "$n" --connect-concurrency 64
    done
    for n in 1 10 100 1000; do
        compare "curve-fanout-$n" always -- --scenario fanout --subscribers "$n" --qos 0 --duration 3
    done
fi

report "$RESULTS"
