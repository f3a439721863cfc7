#!/usr/bin/env bash
# `make bench`: the whole stack measured side by side with raw PostgreSQL (pgbench) and raw Redis
# (redis-benchmark), in the same run on the same machine (tests/bench/main.rs says what runs).
# `make bench-quick` (`scripts/bench.sh --quick`): the same table with 3 s runs and a 12,000-lot
# generated plant.
#
# 1. scripts/deps.sh up (PostgreSQL and Redis; installs pgbench / redis-benchmark when missing)
# 2. cargo build --release --workspace --bins (services and the mes-bench driver)
# 3. target/release/mes-bench, which starts the four services on free ports against fresh
#    databases and a unique Redis prefix, seeds a bench plant, runs each load and prints figures
#    with the baseline, the ratio, the goal of issue 10, the CPU time per request of each service
#    and the feed lag; the table also goes to target/bench/results.json and results.md; the
#    databases are dropped at the end
#
# Settings (environment): MES_BENCH_CLIENTS (32), MES_BENCH_SECONDS (15 per run; 3 quick),
# MES_BENCH_WORK_ORDERS (8: the contended write load), MES_BENCH_BATCH (20), MES_BENCH_LOTS
# (120,000; 12,000 quick), MES_BENCH_OUT (target/bench), MES_BENCH_ONLY (groups to run: write,
# batch, cached, cold; all when unset). The figures are only comparable within
# one run: the services, the databases and the load generators all share this machine.
set -euo pipefail

case "${1:-}" in
    --quick) export MES_BENCH_QUICK=1 ;;
    "") ;;
    *) echo "usage: scripts/bench.sh [--quick]" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf '==> %s\n' "$*"; }

need=()
command -v pgbench >/dev/null 2>&1 || need+=(postgresql-client)
command -v redis-benchmark >/dev/null 2>&1 || need+=(redis-tools)
if ((${#need[@]})); then
    [[ "$(id -u)" == 0 ]] || { echo "bench: install ${need[*]} (needs root)" >&2; exit 1; }
    say "apt-get install ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

STARTED="$(mktemp)"
cleanup() {
    if [[ -s "$STARTED" ]]; then
        mapfile -t started <"$STARTED"
        scripts/deps.sh down "${started[@]}" || true
    fi
    rm -f "$STARTED"
}
trap cleanup EXIT
MES_DEPS_STARTED_FILE="$STARTED" scripts/deps.sh up

say "cargo build --release --workspace --bins"
cargo build --release --workspace --bins
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
"$TARGET/release/mes-bench"
