#!/usr/bin/env bash
# Runs every fuzz target for a bounded time: `fuzz/run.sh [seconds per target]` (default 20).
# CI runs it before the tests. Stable toolchain, no sanitizer: the code under test is safe Rust,
# so libFuzzer is here for panics, overflows (debug assertions are on), hangs and runaway memory.
# A crash prints the input (and its base64); turn it into a regression test beside the code.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-20}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
flags=(--release --debug-assertions --sanitizer none)
cargo fuzz build "${flags[@]}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in $(cargo fuzz list); do
  mkdir -p "corpus/$target"
  # -timeout: one input taking 10 s is a hang; -rss_limit_mb: runaway memory is a finding too.
  if cargo fuzz run "${flags[@]}" "$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    echo "fuzz: $target: ${runs:-?} inputs in ${seconds}s, no failure"
  else
    tail -n 60 "$log"
    echo "fuzz: $target found a failure (above)"
    exit 1
  fi
done
