#!/usr/bin/env bash
# Local dependencies for development and tests: PostgreSQL and Redis.
#
#   scripts/deps.sh up                 make sure PostgreSQL and Redis answer; start throwaway local
#                                      ones only when nothing answers on the configured ports
#   scripts/deps.sh down [STATE...]    stop what `up` started (all of it, or only the given state files)
#   scripts/deps.sh down --purge       ... and delete the throwaway PostgreSQL data directories
#   scripts/deps.sh crash STATE        stop a PostgreSQL this script started as a crash would
#                                      (`pg_ctl stop -m immediate`: no checkpoint, recovery on the
#                                      next `up`); the fault suite uses it on its private server
#   scripts/deps.sh status             what answers, and what this script started
#
# Settings (environment):
#   MES_PG_HOST, MES_PG_PORT        PostgreSQL to check (default taken from MES_DATABASE_URL, else
#                                   127.0.0.1:5432)
#   MES_REDIS_HOST, MES_REDIS_PORT  Redis to check (default taken from MES_REDIS_URL, else
#                                   127.0.0.1:6379)
#   MES_STATE_DIR                   where state, data and logs go (default <repo>/var)
#   MES_PG_OS_USER                  unprivileged OS user that runs a throwaway PostgreSQL when this
#                                   script runs as root (default: mes-pg, created if missing)
#   MES_PG_DURABLE                  `true`: a throwaway PostgreSQL keeps synchronous_commit on, so a
#                                   commit it acknowledged survives a crash of the server (not of the
#                                   machine: fsync stays off); the fault suite crashes it on purpose
#   MES_DEPS_STARTED_FILE           if set, `up` appends the state file of everything it started in
#                                   this call, so a caller (scripts/run.sh, .ci/run) can stop exactly that
#
# A throwaway server only ever listens on 127.0.0.1. Servers this script did not start are never
# stopped by it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${MES_STATE_DIR:-$ROOT/var}"
DEPS_DIR="$STATE_DIR/deps"

log() { printf 'deps: %s\n' "$*" >&2; }
die() { printf 'deps: error: %s\n' "$*" >&2; exit 1; }

# --- configuration --------------------------------------------------------------------------------

# url_host_port URL DEFAULT_PORT -> "host port" ("" when URL does not parse)
url_host_port() {
    local url="$1" def_port="$2"
    if [[ "$url" =~ ^[A-Za-z+]+://([^@/]*@)?(\[[^]]+\]|[^:/?]+)(:([0-9]+))? ]]; then
        printf '%s %s\n' "${BASH_REMATCH[2]}" "${BASH_REMATCH[4]:-$def_port}"
    fi
}

PG_HOST=127.0.0.1 PG_PORT=5432
if [[ -n "${MES_DATABASE_URL:-}" ]]; then
    read -r PG_HOST PG_PORT < <(url_host_port "$MES_DATABASE_URL" 5432) || true
fi
PG_HOST="${MES_PG_HOST:-${PG_HOST:-127.0.0.1}}"
PG_PORT="${MES_PG_PORT:-${PG_PORT:-5432}}"

REDIS_HOST=127.0.0.1 REDIS_PORT=6379
if [[ -n "${MES_REDIS_URL:-}" ]]; then
    read -r REDIS_HOST REDIS_PORT < <(url_host_port "$MES_REDIS_URL" 6379) || true
fi
REDIS_HOST="${MES_REDIS_HOST:-${REDIS_HOST:-127.0.0.1}}"
REDIS_PORT="${MES_REDIS_PORT:-${REDIS_PORT:-6379}}"

[[ "$PG_PORT" =~ ^[0-9]+$ ]] || die "PostgreSQL port '$PG_PORT' is not a number"
[[ "$REDIS_PORT" =~ ^[0-9]+$ ]] || die "Redis port '$REDIS_PORT' is not a number"

is_local_host() { [[ "$1" == 127.0.0.1 || "$1" == localhost || "$1" == "[::1]" || "$1" == ::1 ]]; }

# --- probes (fast: each gives up after about a second) ----------------------------------------------

tcp_open() { # host port
    # shellcheck disable=SC2016 # $0/$1 expand in the child bash
    timeout 1 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

pg_up() { # host port
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h "$1" -p "$2" -t 1 >/dev/null 2>&1
    else
        tcp_open "$1" "$2"
    fi
}

redis_up() { # host port
    if command -v redis-cli >/dev/null 2>&1; then
        [[ "$(timeout 2 redis-cli -h "$1" -p "$2" ping 2>/dev/null || true)" == PONG ]]
    else
        local reply=""
        # shellcheck disable=SC2016 # $0/$1 expand in the child bash
        reply="$(timeout 1 bash -c 'exec 3<>"/dev/tcp/$0/$1"; printf "PING\r\n" >&3; head -c 5 <&3' \
            "$1" "$2" 2>/dev/null || true)"
        [[ "$reply" == "+PONG" ]]
    fi
}

wait_for() { # seconds description command...
    local secs="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
    log "$what is up"
}

# --- packages ------------------------------------------------------------------------------------

APT_UPDATED=false
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* by hand"
    [[ "$(id -u)" == 0 ]] || die "installing $* needs root (apt-get)"
    if [[ "$APT_UPDATED" == false ]]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        APT_UPDATED=true
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

pg_bindir() {
    local d
    d="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 3 -path '*/bin/initdb' 2>/dev/null | sort -V | tail -n 1)"
    [[ -n "$d" ]] && dirname "$d"
}

# run_as USER COMMAND... : run a command as an unprivileged user (or as ourselves when not root)
run_as() {
    local user="$1"
    shift
    if [[ "$(id -u)" != 0 ]]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$user" -- "$@"
    elif command -v setpriv >/dev/null 2>&1; then
        local uid gid
        uid="$(id -u "$user")" gid="$(id -g "$user")"
        setpriv --reuid="$uid" --regid="$gid" --init-groups -- "$@"
    else
        su -s /bin/sh "$user" -c "$(printf '%q ' "$@")"
    fi
}

# --- PostgreSQL ----------------------------------------------------------------------------------

pg_state_file() { printf '%s/postgres-%s.state\n' "$DEPS_DIR" "$1"; }
redis_state_file() { printf '%s/redis-%s.state\n' "$DEPS_DIR" "$1"; }

note_started() {
    if [[ -n "${MES_DEPS_STARTED_FILE:-}" ]]; then
        printf '%s\n' "$1" >>"$MES_DEPS_STARTED_FILE"
    fi
}

pg_ensure() {
    if pg_up "$PG_HOST" "$PG_PORT"; then
        log "PostgreSQL answers on $PG_HOST:$PG_PORT (nothing to do)"
        return 0
    fi
    is_local_host "$PG_HOST" ||
        die "PostgreSQL at $PG_HOST:$PG_PORT does not answer, and it is not a local address I could start"
    if tcp_open 127.0.0.1 "$PG_PORT"; then
        # Something listens but is not ready yet (a server starting up, or not PostgreSQL at all).
        wait_for 15 "PostgreSQL on 127.0.0.1:$PG_PORT" pg_up 127.0.0.1 "$PG_PORT" && return 0
        die "port $PG_PORT is taken by something that does not answer as PostgreSQL"
    fi

    local bindir
    bindir="$(pg_bindir || true)"
    if [[ -z "$bindir" ]]; then
        log "PostgreSQL server binaries not found under /usr/lib/postgresql; installing"
        apt_install postgresql postgresql-client
        bindir="$(pg_bindir || true)"
        [[ -n "$bindir" ]] || die "initdb still not found after installing postgresql"
        # Debian's package may have created and started its own cluster on 5432.
        if pg_up "$PG_HOST" "$PG_PORT"; then
            log "PostgreSQL answers on $PG_HOST:$PG_PORT after install"
            return 0
        fi
    fi

    local user="${MES_PG_OS_USER:-mes-pg}"
    if [[ "$(id -u)" == 0 ]]; then
        if ! id -u "$user" >/dev/null 2>&1; then
            log "creating system user $user to run PostgreSQL (initdb refuses root)"
            useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user"
        fi
    else
        user="$(id -un)"
    fi

    local pgroot="$STATE_DIR/pg" datadir
    datadir="$pgroot/$PG_PORT"
    mkdir -p "$pgroot"
    if [[ "$(id -u)" == 0 ]]; then chown "$user" "$pgroot"; fi
    if ! run_as "$user" test -w "$pgroot" 2>/dev/null; then
        # The clone lives where $user cannot reach (e.g. under a 0700 home): fall back to /tmp.
        pgroot="${TMPDIR:-/tmp}/mes-pg-$(id -u)"
        datadir="$pgroot/$PG_PORT"
        mkdir -p "$pgroot"
        if [[ "$(id -u)" == 0 ]]; then chown "$user" "$pgroot"; fi
        log "$STATE_DIR is not writable by $user; using $pgroot"
    fi
    local logfile="$pgroot/$PG_PORT.log"

    if [[ ! -f "$datadir/PG_VERSION" ]]; then
        log "initdb $datadir (user postgres, trust auth, as OS user $user)"
        rm -rf "$datadir"
        run_as "$user" mkdir -p "$datadir"
        run_as "$user" "$bindir/initdb" -D "$datadir" -U postgres --auth=trust -E UTF8 --locale=C \
            --no-sync >"$pgroot/initdb-$PG_PORT.log" 2>&1 ||
            { cat "$pgroot/initdb-$PG_PORT.log" >&2; die "initdb failed"; }
    fi
    if [[ "$(id -u)" == 0 ]]; then
        touch "$logfile"
        chown "$user" "$logfile"
    fi

    log "starting PostgreSQL on 127.0.0.1:$PG_PORT (data $datadir, log $logfile)"
    # Throwaway server: no durability settings, enough connections for parallel test suites.
    # With synchronous_commit off, a server crash loses the last acknowledged commits; a test
    # that crashes the server asks for it on (MES_PG_DURABLE).
    local sync=off
    if [[ "${MES_PG_DURABLE:-false}" == true ]]; then sync=on; fi
    if ! run_as "$user" "$bindir/pg_ctl" -D "$datadir" -l "$logfile" -w -t 60 -s \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories='' -c max_connections=300 -c fsync=off -c synchronous_commit=$sync -c full_page_writes=off" \
        start; then
        tail -n 30 "$logfile" >&2 || true
        die "PostgreSQL did not start"
    fi
    mkdir -p "$DEPS_DIR"
    local state
    state="$(pg_state_file "$PG_PORT")"
    {
        printf 'kind=postgres\n'
        printf 'port=%s\n' "$PG_PORT"
        printf 'user=%s\n' "$user"
        printf 'bindir=%s\n' "$bindir"
        printf 'datadir=%s\n' "$datadir"
        printf 'log=%s\n' "$logfile"
    } >"$state"
    note_started "$state"
    wait_for 15 "PostgreSQL on 127.0.0.1:$PG_PORT" pg_up 127.0.0.1 "$PG_PORT" ||
        die "PostgreSQL started but does not answer on 127.0.0.1:$PG_PORT"
}

# --- Redis ---------------------------------------------------------------------------------------

redis_ensure() {
    if redis_up "$REDIS_HOST" "$REDIS_PORT"; then
        log "Redis answers on $REDIS_HOST:$REDIS_PORT (nothing to do)"
        return 0
    fi
    is_local_host "$REDIS_HOST" ||
        die "Redis at $REDIS_HOST:$REDIS_PORT does not answer, and it is not a local address I could start"
    if tcp_open 127.0.0.1 "$REDIS_PORT"; then
        wait_for 10 "Redis on 127.0.0.1:$REDIS_PORT" redis_up 127.0.0.1 "$REDIS_PORT" && return 0
        die "port $REDIS_PORT is taken by something that does not answer as Redis"
    fi
    if ! command -v redis-server >/dev/null 2>&1; then
        log "redis-server not found; installing"
        apt_install redis-server redis-tools
        command -v redis-server >/dev/null 2>&1 || die "redis-server still not found after install"
        # Debian's package may have started its own server on 6379.
        if redis_up "$REDIS_HOST" "$REDIS_PORT"; then
            log "Redis answers on $REDIS_HOST:$REDIS_PORT after install"
            return 0
        fi
    fi
    local dir="$STATE_DIR/redis"
    mkdir -p "$dir" "$DEPS_DIR"
    local pidfile="$dir/$REDIS_PORT.pid" logfile="$dir/$REDIS_PORT.log"
    rm -f "$pidfile"
    log "starting Redis on 127.0.0.1:$REDIS_PORT (no persistence, log $logfile)"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
        --dir "$dir" --pidfile "$pidfile" --logfile "$logfile" ||
        die "redis-server failed to start"
    for _ in $(seq 1 50); do
        [[ -s "$pidfile" ]] && break
        sleep 0.1
    done
    [[ -s "$pidfile" ]] || { tail -n 20 "$logfile" >&2 || true; die "Redis wrote no pid file"; }
    local state
    state="$(redis_state_file "$REDIS_PORT")"
    {
        printf 'kind=redis\n'
        printf 'port=%s\n' "$REDIS_PORT"
        printf 'pid=%s\n' "$(cat "$pidfile")"
        printf 'log=%s\n' "$logfile"
    } >"$state"
    note_started "$state"
    wait_for 10 "Redis on 127.0.0.1:$REDIS_PORT" redis_up 127.0.0.1 "$REDIS_PORT" ||
        { tail -n 20 "$logfile" >&2 || true; die "Redis started but does not answer"; }
}

# --- stopping ------------------------------------------------------------------------------------

state_get() { # file key
    sed -n "s/^$2=//p" "$1" | head -n 1
}

stop_one() { # state-file purge(true|false)
    local state="$1" purge="$2" kind port
    [[ -f "$state" ]] || { log "no such state file: $state (already stopped?)"; return 0; }
    kind="$(state_get "$state" kind)"
    port="$(state_get "$state" port)"
    case "$kind" in
    postgres)
        local user bindir datadir
        user="$(state_get "$state" user)"
        bindir="$(state_get "$state" bindir)"
        datadir="$(state_get "$state" datadir)"
        if [[ -f "$datadir/postmaster.pid" ]]; then
            log "stopping PostgreSQL on 127.0.0.1:$port (data $datadir)"
            run_as "$user" "$bindir/pg_ctl" -D "$datadir" -m fast -w -t 30 -s stop ||
                log "pg_ctl stop failed for $datadir"
        else
            log "PostgreSQL on port $port is not running"
        fi
        if [[ "$purge" == true && -n "$datadir" && -d "$datadir" ]]; then
            log "removing $datadir"
            rm -rf "$datadir"
            # Its server log and initdb log beside it, too (the fault suite starts one per test).
            local logfile
            logfile="$(state_get "$state" log)"
            if [[ -n "$logfile" ]]; then
                rm -f "$logfile" "$(dirname "$logfile")/initdb-$port.log"
            fi
        fi
        ;;
    redis)
        local pid
        pid="$(state_get "$state" pid)"
        # Only signal the process if it is still the redis-server we started on that port.
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null &&
            tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "redis-server.*:$port"; then
            log "stopping Redis on 127.0.0.1:$port (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            if kill -0 "$pid" 2>/dev/null; then
                log "Redis pid $pid did not stop; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        else
            log "Redis on port $port (pid ${pid:-?}) is not running"
        fi
        ;;
    *)
        log "unknown state file $state; removing it"
        ;;
    esac
    rm -f "$state"
}

cmd_down() {
    local purge=false files=() f
    while (($#)); do
        case "$1" in
        --purge) purge=true ;;
        *) files+=("$1") ;;
        esac
        shift
    done
    if ((${#files[@]} == 0)); then
        shopt -s nullglob
        files=("$DEPS_DIR"/*.state)
        shopt -u nullglob
    fi
    if ((${#files[@]} == 0)); then
        log "nothing was started by this script; nothing to stop"
        return 0
    fi
    for f in "${files[@]}"; do
        stop_one "$f" "$purge"
    done
}

cmd_crash() { # state-file
    local state="${1:-}"
    [[ -f "$state" ]] || die "crash: no such state file: $state"
    [[ "$(state_get "$state" kind)" == postgres ]] || die "crash: $state is not a PostgreSQL"
    local user bindir datadir
    user="$(state_get "$state" user)"
    bindir="$(state_get "$state" bindir)"
    datadir="$(state_get "$state" datadir)"
    log "crashing PostgreSQL on 127.0.0.1:$(state_get "$state" port) (pg_ctl stop -m immediate)"
    run_as "$user" "$bindir/pg_ctl" -D "$datadir" -m immediate -w -t 30 -s stop
}

cmd_status() {
    if pg_up "$PG_HOST" "$PG_PORT"; then
        log "PostgreSQL $PG_HOST:$PG_PORT: up"
    else
        log "PostgreSQL $PG_HOST:$PG_PORT: down"
    fi
    if redis_up "$REDIS_HOST" "$REDIS_PORT"; then
        log "Redis      $REDIS_HOST:$REDIS_PORT: up"
    else
        log "Redis      $REDIS_HOST:$REDIS_PORT: down"
    fi
    local f found=false
    shopt -s nullglob
    for f in "$DEPS_DIR"/*.state; do
        found=true
        log "started by this script: $(state_get "$f" kind) on 127.0.0.1:$(state_get "$f" port) ($f)"
    done
    shopt -u nullglob
    [[ "$found" == true ]] || log "started by this script: nothing"
}

case "${1:-}" in
up)
    pg_ensure
    redis_ensure
    ;;
down)
    shift
    cmd_down "$@"
    ;;
status) cmd_status ;;
crash)
    shift
    cmd_crash "$@"
    ;;
*)
    printf 'usage: %s up | down [--purge] [STATE_FILE...] | crash STATE_FILE | status\n' "$0" >&2
    exit 2
    ;;
esac
