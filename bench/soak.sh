#!/usr/bin/env bash
# The soak (not in CI): `minimesh up` with two replicas of every service,
# then `minimesh bench soak` for DURATION (10 min): unary calls (CreateOrder,
# GetOrder, ListOrders, GetUser) and streams (WatchOrder, TrackOrders)
# through the gateway, a service process or a sidecar killed with SIGKILL
# every KILL_EVERY (60 s) in turn, and every proxy's RSS and open descriptors
# printed every SAMPLE_EVERY (60 s). Ends with the per-minute table, the
# traffic counts and the leak verdict; the JSON goes to
# target/bench/soak.json.
#
# Settings (environment): DURATION, KILL_EVERY, SAMPLE_EVERY, UNARY (8
# workers), STREAMS (4 workers), REPLICAS (user=2,order=2,payment=2),
# MINIMESH_BIN (skip the release build and use this binary), OUT.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${OUT:-$root/target/bench}"
if [ -n "${MINIMESH_BIN:-}" ]; then
  bin="$MINIMESH_BIN"
else
  cargo build --release --locked --bin minimesh --bin minimesh-proxy
  bin="${CARGO_TARGET_DIR:-$root/target}/release/minimesh"
fi
work="$(mktemp -d -t minimesh-soak.XXXXXX)"
up_pid="" ok=""
cleanup() {
  trap - EXIT INT TERM
  set +e
  if [ -n "$up_pid" ]; then
    # `up` drains and stops every child on SIGTERM.
    kill -TERM "$up_pid" 2>/dev/null
    for _ in $(seq 300); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$up_pid" 2>/dev/null
    wait "$up_pid" 2>/dev/null
  fi
  if [ -n "$ok" ]; then rm -rf "$work"; else echo "failed or interrupted; logs kept in $work" >&2; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$out"
# A 250 ms fulfilment step: a followed order is delivered within a second or two.
"$bin" up --data-dir "$work/mesh" --gateway-addr 127.0.0.1:0 --fulfilment-step 250ms \
  --replicas "${REPLICAS:-user=2,order=2,payment=2}" >"$work/up.out" 2>"$work/up.err" &
up_pid=$!
for _ in $(seq 1200); do
  grep -q '^mesh ready' "$work/up.out" && break
  kill -0 "$up_pid" 2>/dev/null || { tail -20 "$work/up.err" >&2; exit 1; }
  sleep 0.1
done
grep -q '^mesh ready' "$work/up.out" || { echo "the mesh was not ready within 120 s" >&2; exit 1; }
"$bin" bench soak --mesh "$work/mesh/mesh.json" --duration "${DURATION:-10m}" \
  --kill-every "${KILL_EVERY:-60s}" --sample-every "${SAMPLE_EVERY:-60s}" \
  --unary "${UNARY:-8}" --streams "${STREAMS:-4}" --json "$out/soak.json"
ok=1
