#!/usr/bin/env bash
# Instructions per call of each sidecar, counted by callgrind: unlike CPU
# time, the same for the same binary and load whatever else the machine is
# doing, so two builds compare to a fraction of a percent on a noisy box.
#   bench/instructions.sh target/release/minimesh-proxy
#   bench/instructions.sh --old target/compare/target-8951c16/release/minimesh target/release/minimesh-proxy
# Each BIN runs an order sidecar (outbound) and a payment sidecar (inbound)
# under callgrind in front of the echo backend; COUNT unary 100 B calls at
# CONCURRENCY are counted after a warm-up (env COUNT, CONCURRENCY, CALL, PAYLOAD).
# --old marks the next binary as one from before --route (it routes by path).
# Needs valgrind (Debian's package; installed when missing and root).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
count=${COUNT:-6000}
concurrency=${CONCURRENCY:-64}
call=${CALL:-unary}
payload=${PAYLOAD:-100}
if ! command -v valgrind >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "valgrind missing" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
cd "$root"
cargo build --release --locked --bin minimesh --bin minimesh-proxy -q
tool="$root/target/release/minimesh"
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
"$tool" certs init --out "$work/ca" >/dev/null
for name in order payment; do "$tool" certs issue --ca "$work/ca" --name "$name" --out "$work/id" >/dev/null; done
id() { echo --ca "$work/ca/ca.pem" --cert "$work/id/$1.pem" --key "$work/id/$1.key"; }
# Ports below the ephemeral range (an outgoing connection cannot take
# them), spread by pid so two runs at once do not collide.
base=$((20000 + ($$ % 1000) * 10))
backend=127.0.0.1:$base
"$tool" bench backend --listen "$backend" >"$work/backend.log" 2>&1 &
pids+=($!)
routes=yes
for bin in "$@"; do
  if [ "$bin" = --old ]; then routes=no; continue; fi
  label=$bin
  base=$((base + 8))
  pay_in=127.0.0.1:$((base + 1)); out=127.0.0.1:$((base + 2))
  vg=(valgrind --tool=callgrind --instr-atstart=no --dump-instr=no)
  "${vg[@]}" --callgrind-out-file="$work/in.cg" "$bin" sidecar --service payment --inbound "$pay_in" \
    --outbound 127.0.0.1:$((base + 3)) --admin 127.0.0.1:$((base + 4)) --app "$backend" --allow order $(id payment) \
    >"$work/in.log" 2>&1 &
  pids+=($!); in_pid=$!
  extra=()
  [ $routes = yes ] && extra=(--route shop.payment.=payment --route shop.order.=order)
  "${vg[@]}" --callgrind-out-file="$work/out.cg" "$bin" sidecar --service order --inbound 127.0.0.1:$((base + 5)) \
    --outbound "$out" --admin 127.0.0.1:$((base + 6)) --app 127.0.0.1:$((base + 7)) \
    --upstream payment="$pay_in" --upstream order="$pay_in" "${extra[@]}" $(id order) >"$work/out.log" 2>&1 &
  pids+=($!); out_pid=$!
  ready=no
  for _ in $(seq 1 120); do
    if "$tool" bench load --target "http://$out" --count 200 --concurrency 8 2>/dev/null | grep -q '"errors": {}'; then ready=yes; break; fi
    sleep 0.5
  done
  [ $ready = yes ] || { echo "$bin: the sidecars never answered (logs in $work)" >&2; trap - EXIT; exit 1; }
  "$tool" bench load --target "http://$out" --count 1000 --concurrency "$concurrency" >/dev/null
  callgrind_control -i on "$in_pid" >/dev/null 2>&1; callgrind_control -i on "$out_pid" >/dev/null 2>&1
  "$tool" bench load --target "http://$out" --call "$call" --payload "$payload" --count "$count" --concurrency "$concurrency" >"$work/load.json"
  callgrind_control -i off "$in_pid" >/dev/null 2>&1; callgrind_control -i off "$out_pid" >/dev/null 2>&1
  callgrind_control -d "$in_pid" >/dev/null 2>&1; callgrind_control -d "$out_pid" >/dev/null 2>&1
  for role in in out; do
    total=$(callgrind_annotate "$work/$role.cg.1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !seen {gsub(",", "", $1); print $1; seen = 1}')
    echo "$label $([ $role = in ] && echo inbound || echo outbound): $((total / count)) instructions per call ($count $call calls of $payload B at concurrency $concurrency)"
  done
  kill "$in_pid" "$out_pid" 2>/dev/null || true
  wait "$in_pid" "$out_pid" 2>/dev/null || true
  rm -f "$work"/*.cg*
  routes=yes
done
