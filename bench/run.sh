#!/usr/bin/env bash
# The one command for BENCHMARKS.md: installs HAProxy and nginx from Debian's
# packages when missing, builds minimesh in release mode, and runs every
# scenario side by side (results in target/bench/results.{json,md}).
# Extra arguments go to `minimesh bench suite` (e.g. --rounds 5, --smoke).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ] || { ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; }; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx >/dev/null
    # The packages may start system instances; the suite runs its own.
    pkill -x nginx 2>/dev/null || true
    pkill -x haproxy 2>/dev/null || true
  else
    echo "haproxy/nginx missing and not root: those scenarios will be skipped" >&2
  fi
fi
cargo build --release --locked --bin minimesh --bin minimesh-proxy
exec target/release/minimesh bench suite --proxy-bin target/release/minimesh-proxy "$@"
