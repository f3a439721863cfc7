#!/usr/bin/env bash
# `make run`: the whole system on the demo plant, on this machine.
#
# 1. scripts/deps.sh up (PostgreSQL and Redis: uses running ones, starts throwaway ones otherwise)
# 2. cargo build --workspace --bins
# 3. starts scan-ingest, trace-query, erp-sync and gateway in that order, with MES_DEMO=true and
#    MES_LOG_FORMAT=pretty unless set; logs go to var/log/<service>.log
# 4. waits for the gateway's /readyz, prints URLs, demo users and a curl example
# 5. runs until Ctrl-C (or until a service exits), then stops the services and whatever step 1 started
#
# Any MES_* variable set in the environment is passed through (see deploy/mes.example.toml);
# MES_INTERNAL_KEY, when not set, is a random key for this run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SERVICES=(scan-ingest trace-query erp-sync gateway)
STATE_DIR="${MES_STATE_DIR:-$ROOT/var}"
LOG_DIR="$STATE_DIR/log"
RUN_DIR="$STATE_DIR/run"
READY_TIMEOUT="${MES_RUN_READY_TIMEOUT:-90}"

export MES_DEMO="${MES_DEMO:-true}"
export MES_LOG_FORMAT="${MES_LOG_FORMAT:-pretty}"
# The four services sign the caller identity of their internal calls with one shared key; unless
# one is given, this run makes up its own (nothing else needs to know it).
if [[ -z "${MES_INTERNAL_KEY:-}" ]]; then
    MES_INTERNAL_KEY="$(head -c 32 /dev/urandom | base64 | tr -d '\n')"
fi
export MES_INTERNAL_KEY

say() { printf '==> %s\n' "$*"; }
warn() { printf 'run: %s\n' "$*" >&2; }

# --- addresses -------------------------------------------------------------------------------------

# env_name SERVICE KEY -> MES_<SERVICE>_<KEY> (scan-ingest -> SCAN_INGEST)
env_name() {
    local s="${1//-/_}"
    printf 'MES_%s_%s\n' "${s^^}" "$2"
}

# port_of SERVICE KEY DEFAULT_PORT: the port of MES_<SERVICE>_<KEY> (or MES_<KEY>), else the default
port_of() {
    local var addr
    var="$(env_name "$1" "$2")"
    addr="${!var:-}"
    if [[ -z "$addr" ]]; then
        var="MES_$2"
        addr="${!var:-}"
    fi
    if [[ "$addr" =~ :([0-9]+)$ ]]; then
        printf '%s\n' "${BASH_REMATCH[1]}"
    else
        printf '%s\n' "$3"
    fi
}

declare -A GRPC_PORT=(
    [scan-ingest]="$(port_of scan-ingest LISTEN_ADDR 50051)"
    [trace-query]="$(port_of trace-query LISTEN_ADDR 50052)"
    [erp-sync]="$(port_of erp-sync LISTEN_ADDR 50053)"
)
declare -A METRICS_PORT=(
    [scan-ingest]="$(port_of scan-ingest METRICS_ADDR 9091)"
    [trace-query]="$(port_of trace-query METRICS_ADDR 9092)"
    [erp-sync]="$(port_of erp-sync METRICS_ADDR 9093)"
)
GATEWAY_PORT="$(port_of gateway LISTEN_ADDR 8080)"
BASE="http://127.0.0.1:$GATEWAY_PORT"

listen_port() { # service -> the port that shows the service is listening
    if [[ "$1" == gateway ]]; then printf '%s\n' "$GATEWAY_PORT"; else printf '%s\n' "${GRPC_PORT[$1]}"; fi
}

tcp_open() {
    # shellcheck disable=SC2016 # $0/$1 expand in the child bash
    timeout 1 bash -c 'exec 3<>"/dev/tcp/$0/$1"' 127.0.0.1 "$1" 2>/dev/null
}

# --- process bookkeeping -----------------------------------------------------------------------------

declare -A PID=()
DEPS_STARTED="$(mktemp "${TMPDIR:-/tmp}/mes-run-deps.XXXXXX")"
export MES_DEPS_STARTED_FILE="$DEPS_STARTED"
CLEANED=false

stop_services() {
    local i s pid grace deadline
    grace="${MES_SHUTDOWN_GRACE_SECONDS:-20}"
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do # reverse order: gateway first
        s="${SERVICES[$i]}"
        pid="${PID[$s]:-}"
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            say "stopping $s (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    deadline=$((SECONDS + grace + 5))
    for s in "${SERVICES[@]}"; do
        pid="${PID[$s]:-}"
        [[ -n "$pid" ]] || continue
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.2
        done
        if kill -0 "$pid" 2>/dev/null; then
            warn "$s (pid $pid) did not stop within ${grace}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
        rm -f "$RUN_DIR/$s.pid"
    done
}

cleanup() {
    local rc=$?
    if [[ "$CLEANED" == true ]]; then return; fi
    CLEANED=true
    trap - INT TERM EXIT
    stop_services
    if [[ -s "$DEPS_STARTED" ]]; then
        say "stopping the dependencies started for this run"
        mapfile -t started <"$DEPS_STARTED"
        scripts/deps.sh down "${started[@]}" || true
    fi
    rm -f "$DEPS_STARTED"
    exit "$rc"
}
on_signal() {
    printf '\n'
    say "shutting down"
    exit 0 # runs cleanup through the EXIT trap
}
trap cleanup EXIT
trap on_signal INT TERM

show_logs() {
    local s
    for s in "$@"; do
        printf '\n----- last lines of %s -----\n' "$LOG_DIR/$s.log" >&2
        tail -n 40 "$LOG_DIR/$s.log" >&2 2>/dev/null || true
    done
}

check_alive() { # returns 1 (after reporting) when a started service has exited
    local s pid rc
    for s in "${!PID[@]}"; do
        pid="${PID[$s]}"
        if ! kill -0 "$pid" 2>/dev/null; then
            rc=0
            wait "$pid" 2>/dev/null || rc=$?
            unset "PID[$s]"
            warn "$s exited early (exit code $rc); log: $LOG_DIR/$s.log"
            show_logs "$s"
            return 1
        fi
    done
}

# --- 1. dependencies -----------------------------------------------------------------------------

say "dependencies"
scripts/deps.sh up

# --- 2. build ------------------------------------------------------------------------------------

say "cargo build --workspace --bins"
cargo build --workspace --bins

TARGET_DIR="${CARGO_TARGET_DIR:-}"
if [[ -z "$TARGET_DIR" ]]; then
    TARGET_DIR="$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p' || true)"
fi
TARGET_DIR="${TARGET_DIR:-target}"
[[ "$TARGET_DIR" = /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
BIN_DIR="$TARGET_DIR/debug"

# --- 3. start ------------------------------------------------------------------------------------

mkdir -p "$LOG_DIR" "$RUN_DIR"
for s in "${SERVICES[@]}"; do
    [[ -x "$BIN_DIR/$s" ]] || { warn "binary $BIN_DIR/$s not found after the build"; exit 1; }
    # A service left over from a run that was killed hard: stop it (it is ours: same binary).
    if [[ -f "$RUN_DIR/$s.pid" ]]; then
        old="$(cat "$RUN_DIR/$s.pid")"
        if [[ -n "$old" && "$(readlink "/proc/$old/exe" 2>/dev/null || true)" == "$BIN_DIR/$s" ]]; then
            warn "stopping $s left over from an earlier run (pid $old)"
            kill -TERM "$old" 2>/dev/null || true
            for _ in $(seq 1 100); do kill -0 "$old" 2>/dev/null || break; sleep 0.2; done
        fi
        rm -f "$RUN_DIR/$s.pid"
    fi
    port="$(listen_port "$s")"
    if tcp_open "$port"; then
        warn "port $port (for $s) is already in use; stop whatever listens there, or set $(env_name "$s" LISTEN_ADDR)"
        exit 1
    fi
done

deadline=$((SECONDS + READY_TIMEOUT))
for s in "${SERVICES[@]}"; do
    log="$LOG_DIR/$s.log"
    if [[ -f "$log" ]]; then mv -f "$log" "$log.1"; fi
    say "starting $s (log $log)"
    # Own session: Ctrl-C reaches only this script, which then stops the services in order.
    if command -v setsid >/dev/null 2>&1; then
        setsid "$BIN_DIR/$s" >"$log" 2>&1 </dev/null &
    else
        "$BIN_DIR/$s" >"$log" 2>&1 </dev/null &
    fi
    PID[$s]=$!
    printf '%s\n' "${PID[$s]}" >"$RUN_DIR/$s.pid"
    # Start the next one once this one listens, so clients find their servers.
    port="$(listen_port "$s")"
    until tcp_open "$port"; do
        check_alive || exit 1
        if ((SECONDS >= deadline)); then
            warn "$s does not listen on port $port after ${READY_TIMEOUT}s"
            show_logs "$s"
            exit 1
        fi
        sleep 0.3
    done
done

# --- 4. ready ------------------------------------------------------------------------------------

say "waiting for $BASE/readyz"
until curl -fsS -o /dev/null --max-time 2 "$BASE/readyz" 2>/dev/null; do
    check_alive || exit 1
    if ((SECONDS >= deadline)); then
        warn "the gateway is not ready after ${READY_TIMEOUT}s ($BASE/readyz)"
        show_logs "${SERVICES[@]}"
        exit 1
    fi
    sleep 1
done

cat <<EOF

MES is running (demo plant, MES_DEMO=$MES_DEMO). Logs: $LOG_DIR/<service>.log

  REST API      $BASE/api/v1
  OpenAPI       $BASE/openapi.json
  Health        $BASE/api/v1/health   (liveness $BASE/healthz, readiness $BASE/readyz)
  Metrics       $BASE/metrics (gateway)
                http://127.0.0.1:${METRICS_PORT[scan-ingest]}/metrics (scan-ingest)
                http://127.0.0.1:${METRICS_PORT[trace-query]}/metrics (trace-query)
                http://127.0.0.1:${METRICS_PORT[erp-sync]}/metrics (erp-sync)
  gRPC          scan-ingest 127.0.0.1:${GRPC_PORT[scan-ingest]}, trace-query 127.0.0.1:${GRPC_PORT[trace-query]}, erp-sync 127.0.0.1:${GRPC_PORT[erp-sync]}

WARNING: DEMO CREDENTIALS. These users exist only because MES_DEMO=true; their passwords are public.
         Never enable demo mode on a system that is reachable by anyone else.

  username  password     role
  --------  -----------  ----------
  admin     demo-admin   admin
  sup1      demo-sup1    supervisor
  op1       demo-op1     operator
  qa1       demo-qa1     quality
  plan1     demo-plan1   planner

  device    device_secret  station
  --------  -------------  -------
  TAB-10    demo-TAB-10    ST-10
  TAB-20    demo-TAB-20    ST-20
  TAB-30    demo-TAB-30    ST-30

Try it (copy and paste into bash): log in as op1 on tablet TAB-10, then start WO-1000 operation 10 at ST-10:

TOKEN=\$(curl -fsS -X POST $BASE/api/v1/auth/token \\
  -H 'content-type: application/json' \\
  -d '{"username":"op1","password":"demo-op1","device_id":"TAB-10","device_secret":"demo-TAB-10"}' \\
  | sed -n 's/.*"access_token" *: *"\\([^"]*\\)".*/\\1/p')
curl -sS -X POST $BASE/api/v1/scans \\
  -H "authorization: Bearer \$TOKEN" -H 'content-type: application/json' \\
  -d '{"scans":[{"scan_id":"'"\$(cat /proc/sys/kernel/random/uuid)"'","kind":"start_operation","work_order":"WO-1000","operation":10,"station":"ST-10","scanned_at":"'"\$(date -u +%Y-%m-%dT%H:%M:%SZ)"'"}]}'; echo

Press Ctrl-C to stop everything.
EOF

# --- 5. run until Ctrl-C or until a service exits -----------------------------------------------

while true; do
    if ! check_alive; then
        warn "stopping everything because a service exited"
        exit 1
    fi
    sleep 1 &
    wait $! || true
done
