#!/usr/bin/env bash
# Profiles the mesh path as BENCHMARKS.md describes: an echo backend, the
# order sidecar (outbound) and the payment sidecar (inbound) with mTLS between
# them, 100 B unary calls at concurrency 64, and `perf record` on both sidecars.
# Writes target/bench/profile/{perf.data,report.txt,flamegraph.svg}.
# Needs perf (Debian's linux-perf) and installs inferno (flamegraphs) with cargo.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out=target/bench/profile
mkdir -p "$out"

if ! command -v perf >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
fi
if ! command -v inferno-flamegraph >/dev/null 2>&1; then
  cargo install --quiet --locked inferno
fi
cargo build --release --locked --bin minimesh --bin minimesh-proxy
bin=target/release/minimesh
proxy=target/release/minimesh-proxy

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$bin" certs init --out "$work/ca" >/dev/null
for name in order payment; do
  "$bin" certs issue --ca "$work/ca" --name "$name" --out "$work/$name" >/dev/null
done
backend=127.0.0.1:$(port)
inbound=127.0.0.1:$(port)
outbound=127.0.0.1:$(port)
export RUST_LOG=info

"$bin" bench backend --listen "$backend" >"$work/backend.log" 2>&1 &
pids+=($!)
"$proxy" sidecar --service payment --inbound "$inbound" --outbound 127.0.0.1:$(port) \
  --admin 127.0.0.1:$(port) --app "$backend" --allow order \
  --ca "$work/ca/ca.pem" --cert "$work/payment/payment.pem" --key "$work/payment/payment.key" \
  >"$work/payment.log" 2>&1 &
pids+=($!)
payment_sidecar=$!
"$proxy" sidecar --service order --inbound 127.0.0.1:$(port) --outbound "$outbound" \
  --admin 127.0.0.1:$(port) --app 127.0.0.1:$(port) --upstream "payment=$inbound" \
  --route shop.payment.=payment \
  --ca "$work/ca/ca.pem" --cert "$work/order/order.pem" --key "$work/order/order.key" \
  >"$work/order.log" 2>&1 &
pids+=($!)
order_sidecar=$!

# Ready when one call goes through the whole path.
for _ in $(seq 1 100); do
  if "$bin" bench load --target "http://$outbound" --count 1 --duration 2s 2>/dev/null \
    | grep -q '"ok": 1'; then
    ready=1
    break
  fi
  sleep 0.1
done
if [ "${ready:-0}" != 1 ]; then
  cp "$work"/*.log "$out"/
  echo "the mesh path never answered; logs copied to $out" >&2
  exit 1
fi

"$bin" bench load --target "http://$outbound" --concurrency 64 --duration 12s >"$out/load.json" &
load=$!
sleep 3 # let the load settle before sampling
perf record -e cpu-clock -F 1999 --call-graph dwarf,32768 -p "$order_sidecar,$payment_sidecar" \
  -o "$out/perf.data" -- sleep 5 2>"$out/perf-record.log"
wait "$load"

perf report -i "$out/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null \
  | grep '%' | sed -n '1,60p' >"$out/report.txt"
perf script -i "$out/perf.data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph \
  --title "minimesh sidecars, 100 B unary, c=64" >"$out/flamegraph.svg"
echo "wrote $out/report.txt and $out/flamegraph.svg"
