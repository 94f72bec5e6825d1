# Starting and stopping one broker at a time on a loopback port, for the benchmark scripts
# (sourced, not run). The caller sets WORK (a temp dir for configs and logs) and BIN (the
# directory of Herald's release binaries); the functions set BROKER_PID and PORT.

BROKER_PID=""
PORT=""

# A TCP port on 127.0.0.1 that nothing listens on, below the ephemeral range.
free_port() {
    local port
    for _ in $(seq 1 100); do
        port=$((20000 + RANDOM % 12000))
        if [[ -z "$(ss -Htln "sport = :$port" 2>/dev/null)" ]]; then
            echo "$port"
            return
        fi
    done
    echo "no free port" >&2
    return 1
}

# TERM, up to 10 s to exit cleanly, then KILL.
stop_broker() {
    if [[ -n "$BROKER_PID" ]]; then
        kill -TERM "$BROKER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$BROKER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
        BROKER_PID=""
    fi
}

# run_herald CONFIG DIR: `herald serve` on CONFIG, its stdout in DIR/stdout and its log in
# $WORK/herald.log; waits for the port it prints (its TCP listener binds port 0).
run_herald() {
    local config=$1 dir=$2
    # Emptied here, not by the redirection below (which runs in the background): a line from
    # an earlier run must not be taken for this one's.
    : >"$dir/stdout"
    RUST_LOG=warn "$BIN/herald" serve --config "$config" >"$dir/stdout" 2>>"$WORK/herald.log" &
    BROKER_PID=$!
    for _ in $(seq 1 200); do
        if grep -q '^herald: listening tcp ' "$dir/stdout" 2>/dev/null; then
            PORT=$(sed -n 's/^herald: listening tcp .*:\([0-9]*\)$/\1/p' "$dir/stdout" | head -1)
            if [[ -n "$PORT" ]]; then return; fi
        fi
        kill -0 "$BROKER_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "herald did not start; see $WORK/herald.log" >&2
    tail -20 "$WORK/herald.log" >&2
    return 1
}

# The line a Mosquitto config needs when the script runs as root: Mosquitto would otherwise
# switch to the 'mosquitto' user, who cannot write in $WORK.
mosquitto_user_line() {
    if [[ $(id -u) == 0 ]]; then echo "user root"; fi
}

# run_mosquitto CONFIG: Mosquitto on CONFIG, which must listen on 127.0.0.1:$PORT; its output
# in $WORK/mosquitto.log. Waits until the port listens.
run_mosquitto() {
    local config=$1
    mosquitto -c "$config" >>"$WORK/mosquitto.log" 2>&1 &
    BROKER_PID=$!
    for _ in $(seq 1 200); do
        if [[ -n "$(ss -Htln "sport = :$PORT" 2>/dev/null)" ]]; then
            return
        fi
        kill -0 "$BROKER_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "mosquitto did not start; see $WORK/mosquitto.log" >&2
    tail -20 "$WORK/mosquitto.log" >&2 || true
    return 1
}
