#!/usr/bin/env bash
# The one command for the CreateOrder table in BENCHMARKS.md: builds minimesh
# in release mode, starts one throwaway PostgreSQL 15 (pg_virtualenv), and
# measures CreateOrder through the gateway of `minimesh up` in three
# configurations, interleaved round by round (A B C A B C …) so the machine's
# noise hits them alike:
#   sqlite     SQLite files, 1 replica per service (the embedded default)
#   postgres1  PostgreSQL, 1 replica per service
#   postgres3  PostgreSQL, 3 replicas per service
# Every configuration of every round gets a fresh data dir and, on
# PostgreSQL, a fresh database. Results: target/bench/orders.{json,md} and the
# raw runs in target/bench/orders-raw/.
#
# Settings (environment): ROUNDS (default 3), CONCURRENCY (1,8,32),
# DURATION (10s measured per concurrency), WARMUP (2s), FULFILMENT_STEP (1h:
# no order reaches a fulfilment step during a run, so only CreateOrder's own
# work is measured), CONFIGS (sqlite,postgres1,postgres3), OUT
# (target/bench), MINIMESH_BIN (skip the build and use this binary),
# PG_SETTINGS (extra postgresql.conf settings for a diagnostic run, e.g.
# "synchronous_commit=off"; the table is for PostgreSQL's defaults),
# PROFILE=1 (after each configuration: CPU ms per order of every role, from
# /proc, and on PostgreSQL the backends' states and wait events, sampled
# from pg_stat_activity every 20 ms; see bench/orders_profile.py).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

rounds="${ROUNDS:-3}"
concurrency="${CONCURRENCY:-1,8,32}"
duration="${DURATION:-10s}"
warmup="${WARMUP:-2s}"
step="${FULFILMENT_STEP:-1h}"
configs="${CONFIGS:-sqlite,postgres1,postgres3}"
out="${OUT:-$root/target/bench}"
pg_settings=(-o max_connections=300)
for setting in ${PG_SETTINGS:-}; do pg_settings+=(-o "$setting"); done
raw="$out/orders-raw"

if [ -n "${MINIMESH_BIN:-}" ]; then
  bin="$MINIMESH_BIN"
else
  cargo build --release --locked --bin minimesh --bin minimesh-proxy
  bin="${CARGO_TARGET_DIR:-$root/target}/release/minimesh"
fi
command -v pg_virtualenv >/dev/null || {
  echo "pg_virtualenv not found: install postgresql-common and postgresql (apt-get install -y postgresql)" >&2
  exit 1
}

work="$(mktemp -d -t minimesh-orders.XXXXXX)"
up_pid="" bench_pid="" pg_pid="" sampler_pid="" ok=""

stop_up() {
  [ -n "$up_pid" ] || return 0
  kill -TERM "$up_pid" 2>/dev/null || true
  # `up` drains and stops its children on SIGTERM; give it 30 s.
  for _ in $(seq 300); do
    kill -0 "$up_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$up_pid" 2>/dev/null || true
  wait "$up_pid" 2>/dev/null || true
  up_pid=""
}

cleanup() {
  trap - EXIT INT TERM
  set +e
  [ -n "$bench_pid" ] && kill -TERM "$bench_pid" 2>/dev/null
  [ -n "$sampler_pid" ] && kill -TERM "$sampler_pid" 2>/dev/null
  stop_up
  # Ending the placeholder command makes pg_virtualenv stop and drop its cluster.
  if [ -n "$pg_pid" ]; then
    [ -f "$work/pg-holder.pid" ] && kill -TERM "$(cat "$work/pg-holder.pid")" 2>/dev/null
    wait "$pg_pid" 2>/dev/null || true
  fi
  if [ -n "$ok" ]; then
    rm -rf "$work"
  else
    echo "failed or interrupted; logs kept in $work" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# One cluster for the whole run. -t keeps it in a temporary directory even
# as root, so it cannot collide with another pg_virtualenv on the machine.
# 3 replicas of 3 services with pools of 16 may open 144 connections: more
# than the default 100.
pg_virtualenv -t -v 15 "${pg_settings[@]}" sh -c \
  'echo $$ > "$1/pg-holder.pid"; env | grep "^PG" > "$1/pg.env.tmp"; mv "$1/pg.env.tmp" "$1/pg.env"; exec sleep infinity' \
  sh "$work" >"$work/pg_virtualenv.log" 2>&1 &
pg_pid=$!
for _ in $(seq 600); do
  [ -s "$work/pg.env" ] && break
  kill -0 "$pg_pid" 2>/dev/null || { cat "$work/pg_virtualenv.log" >&2; exit 1; }
  sleep 0.1
done
[ -s "$work/pg.env" ] || { echo "PostgreSQL did not start within 60 s" >&2; exit 1; }
set -a
# shellcheck disable=SC1091
. "$work/pg.env"
set +a
pg_url() { echo "postgres://$PGUSER:$PGPASSWORD@127.0.0.1:$PGPORT/$1?sslmode=disable"; }
psql_q() { psql -X -q -v ON_ERROR_STOP=1 -Atc "$1"; }
profile=(python3 "$root/bench/orders_profile.py")
postmaster=""
[ -n "${PROFILE:-}" ] && postmaster="$(head -1 "$(psql_q 'SHOW data_directory')/postmaster.pid")"

# PROFILE=1: CPU before the workload, and the wait sampler on database $2.
profile_start() {
  "${profile[@]}" snapshot "$up_pid" ${2:+"$postmaster"} >"$1/cpu.before"
  [ -n "$2" ] || return 0
  psql_q "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '$2'" >"$1/xacts.before"
  local q="SELECT replace(application_name, 'minimesh-minimesh_', '') || ' ' || state || ' '
    || coalesce(wait_event_type, 'CPU') || ':' || coalesce(wait_event, '-')
    FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend'
    AND pid <> pg_backend_pid() AND state <> 'idle';"
  # One session for every sample; "#" marks each sample's start.
  # The loop ends when psql does (a failed write), also where SIGPIPE is ignored.
  while printf "SELECT '#';\n%s\nSELECT pg_sleep(0.02);\n" "$q"; do :; done 2>/dev/null |
    psql -X -q -At -d "$2" >"$1/waits.txt" 2>/dev/null &
  sampler_pid=$!
}

# PROFILE=1: CPU ms per order by role, and the waits seen.
profile_report() {
  local dir="$1" db="$2" json="$3" orders
  "${profile[@]}" snapshot "$up_pid" ${db:+"$postmaster"} >"$dir/cpu.after"
  if [ -n "$db" ]; then
    kill -TERM "$sampler_pid" 2>/dev/null
    wait "$sampler_pid" 2>/dev/null || true
    sampler_pid=""
    orders="$(psql -X -Atc 'SELECT count(*) FROM minimesh_order.orders' -d "$db")"
    local xacts
    xacts="$(psql_q "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '$db'")"
    echo "   PostgreSQL transactions per order: $(python3 -c 'import sys; print(round((int(sys.argv[2]) - int(sys.argv[1])) / max(int(sys.argv[3]), 1), 2))' "$(cat "$dir/xacts.before")" "$xacts" "$orders")"
  else
    orders="$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("SELECT count(*) FROM orders").fetchone()[0])' "$dir/order.db")"
  fi
  "${profile[@]}" report "$dir/cpu.before" "$dir/cpu.after" "$orders" "$json" ${db:+"$dir/waits.txt"}
}

label_of() {
  case "$1" in
    sqlite) echo "SQLite, 1 replica" ;;
    postgres1) echo "PostgreSQL, 1 replica" ;;
    postgres3) echo "PostgreSQL, 3 replicas" ;;
    *) echo "unknown configuration $1 (expected sqlite, postgres1, postgres3)" >&2; return 1 ;;
  esac
}

# Runs configuration $2 in round $1; its JSON goes to $3.
measure() {
  local round="$1" config="$2" json="$3" dir="$work/r$1-$2" db="" label
  label="$(label_of "$config")"
  local args=(up --data-dir "$dir" --gateway-addr 127.0.0.1:0 --fulfilment-step "$step")
  local env=()
  case "$config" in
    postgres1 | postgres3)
      db="bench_r${round}_${config}"
      psql_q "CREATE DATABASE $db"
      # The URL goes in the environment, so the password shows in no command line.
      env=(MINIMESH_DATABASE_URL="$(pg_url "$db")")
      ;;
  esac
  [ "$config" = postgres3 ] && args+=(--replicas user=3,order=3,payment=3)
  mkdir -p "$dir"
  env "${env[@]}" "$bin" "${args[@]}" >"$dir/up.out" 2>"$dir/up.err" &
  up_pid=$!
  for _ in $(seq 1200); do
    grep -q '^mesh ready' "$dir/up.out" && break
    kill -0 "$up_pid" 2>/dev/null || { tail -20 "$dir/up.err" >&2; return 1; }
    sleep 0.1
  done
  grep -q '^mesh ready' "$dir/up.out" || { echo "$label: not ready within 120 s" >&2; return 1; }
  local gateway
  gateway="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["gateway"]["addr"])' "$dir/mesh.json")"
  echo "== round $round: $label (gateway $gateway)"
  [ -z "${PROFILE:-}" ] || profile_start "$dir" "$db"
  "$bin" bench orders --target "http://$gateway" --concurrency "$concurrency" \
    --duration "$duration" --warmup "$warmup" --label "$label" --json "$json" &
  bench_pid=$!
  wait "$bench_pid"
  bench_pid=""
  [ -z "${PROFILE:-}" ] || profile_report "$dir" "$db" "$json"
  if [ -n "$db" ]; then
    echo "   connections open to $db: $(psql_q "SELECT count(*) FROM pg_stat_activity WHERE datname = '$db'")"
  fi
  stop_up
  if [ -n "$db" ]; then
    psql_q "DROP DATABASE $db"
  fi
  rm -rf "$dir"
  echo "   load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

rm -rf "$raw"
mkdir -p "$raw"
echo "minimesh $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, PostgreSQL $(psql_q 'SHOW server_version')${PG_SETTINGS:+ ($PG_SETTINGS)}, rounds $rounds, concurrency $concurrency, $duration each after $warmup warm-up; load average $(cut -d' ' -f1-3 /proc/loadavg)"
IFS=',' read -r -a plan <<<"$configs"
for round in $(seq "$rounds"); do
  i=0
  for config in "${plan[@]}"; do
    i=$((i + 1))
    measure "$round" "$config" "$(printf '%s/r%02d-%d-%s.json' "$raw" "$round" "$i" "$config")"
  done
done
"$bin" bench orders-table --baseline "$(label_of "${plan[0]}")" --out "$out" "$raw"/*.json
ok=1
