#!/usr/bin/env bash
# Messages to idle subscribers: N QoS 0 subscribers of one topic that send nothing, and one
# message to all of them every PERIOD seconds for DURATION seconds. Prints the broker's CPU per
# delivery for Herald and, if installed, Mosquitto (docs/benchmarks.md, "Messages to idle
# subscribers"). A fleet of devices that are sent a command now and then looks like this; with
# PERIOD above `limits.park_idle_ms` (100 ms) every Herald subscriber is parked when its message
# comes.
#
#   scripts/bench-idle-subscribers.sh      # N=2000 PERIOD=0.3 DURATION=6 ROUNDS=2
#
# Loopback only; plain MQTT 3.1.1 from Python's standard library (no client package needed).

set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
N=${N:-2000}
PERIOD=${PERIOD:-0.3}
DURATION=${DURATION:-6}
ROUNDS=${ROUNDS:-2}
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
WORK=$(mktemp -d /tmp/herald-idle.XXXXXX)
# free_port, stop_broker, run_herald, run_mosquitto, mosquitto_user_line
source "$ROOT/scripts/lib/brokers.sh"
cleanup() {
    stop_broker
    rm -rf "$WORK"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (($(ulimit -n) < N + 200)); then
    echo "ulimit -n is $(ulimit -n): too low for N=$N" >&2
    exit 2
fi

cat >"$WORK/idle.py" <<'PY'
import asyncio, os, sys, time
port, pid, n, period, duration = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
sys.path.insert(0, sys.argv[6])  # scripts/lib
from mqtt import connect_packet, publish_packet, subscribe_packet
def connect(client_id):
    return connect_packet(client_id, keep_alive=600)
TOPIC = "idle/t"
PAYLOAD = b"cmd!"
PUBLISH = publish_packet(TOPIC, None, PAYLOAD)
delivered = 0
async def subscriber(i, ready):
    global delivered
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect(f"idle-{i}"))
    writer.write(subscribe_packet(1, TOPIC, 0))
    await writer.drain()
    await reader.readexactly(4 + 5)  # CONNACK, SUBACK
    ready.append(i)
    while True:
        data = await reader.read(65536)
        if not data:
            return
        delivered += data.count(PUBLISH)
def cpu_ms():
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 // os.sysconf("SC_CLK_TCK")
async def main():
    ready = []
    tasks = [asyncio.create_task(subscriber(i, ready)) for i in range(n)]
    while len(ready) < n:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # quiet: Herald parks them after 100 ms
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect("idle-publisher"))
    await writer.drain()
    await reader.readexactly(4)
    before, start, sent = cpu_ms(), time.time(), 0
    while time.time() - start < duration:
        writer.write(PUBLISH)
        await writer.drain()
        sent += 1
        await asyncio.sleep(period)
    await asyncio.sleep(0.5)
    used = cpu_ms() - before
    lost = sent * n - delivered
    print(f"messages {sent} deliveries {delivered} (missing {lost}) broker CPU {used} ms, {1000 * used / max(1, delivered):.2f} us per delivery")
    os._exit(0 if lost == 0 else 1)
asyncio.run(main())
PY

start_herald() {
    rm -rf "$WORK/herald"
    mkdir -p "$WORK/herald"
    cat >"$WORK/herald/herald.toml" <<EOT
[node]
id = "idle-bench"
data_dir = "$WORK/herald/data"
[listeners.tcp]
bind = "127.0.0.1:0"
[admin]
enabled = false
[instance]
id = "idle-bench"
allow_anonymous = true
client_id_format = "any"
[limits]
max_connections = 100000
EOT
    run_herald "$WORK/herald/herald.toml" "$WORK/herald"
}

start_mosquitto() {
    PORT=$(free_port)
    {
        echo "listener $PORT 127.0.0.1"
        echo "allow_anonymous true"
        echo "persistence false"
        echo "log_dest stderr"
        echo "log_type error"
        echo "log_type warning"
        mosquitto_user_line
    } >"$WORK/mosquitto.conf"
    run_mosquitto "$WORK/mosquitto.conf"
}

cargo build --release -q -p herald
echo "$N idle QoS 0 subscribers, one message to all every ${PERIOD}s for ${DURATION}s, $ROUNDS rounds"
for round in $(seq 1 "$ROUNDS"); do
    start_herald
    echo "herald:    $(python3 "$WORK/idle.py" "$PORT" "$BROKER_PID" "$N" "$PERIOD" "$DURATION" "$ROOT/scripts/lib")"
    stop_broker
    if command -v mosquitto >/dev/null; then
        start_mosquitto
        echo "mosquitto: $(python3 "$WORK/idle.py" "$PORT" "$BROKER_PID" "$N" "$PERIOD" "$DURATION" "$ROOT/scripts/lib")"
        stop_broker
    fi
done
