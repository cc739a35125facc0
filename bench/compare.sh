#!/usr/bin/env bash
# The suite with an older revision side by side: builds REV's minimesh in
# release mode (its own worktree and target directory under target/compare)
# and runs bench/run.sh with it as the scenario `minimesh-b`, so both are
# measured in one run on the same backend, next to the same HAProxy pair.
#   bench/compare.sh 8951c16            # the revision of the first tables
#   bench/compare.sh 8951c16 --only 2,6 # extra arguments go to the suite
set -euo pipefail
rev=${1:?usage: bench/compare.sh REV [suite arguments...]}
shift
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
sha=$(git rev-parse --short "$rev^{commit}")
src="$root/target/compare/src-$sha"
[ -d "$src" ] || git worktree add --detach "$src" "$sha" >/dev/null
CARGO_TARGET_DIR="$root/target/compare/target-$sha" \
  cargo build --release --manifest-path "$src/Cargo.toml" --bin minimesh
other="$root/target/compare/target-$sha/release/minimesh"
extra=()
# Before the proxy knew no protos it routed by path and had no --route.
if ! "$other" sidecar --help | grep -q -- '--route'; then
  extra+=(--compare-without-routes)
fi
exec bench/run.sh --compare-bin "$other" "${extra[@]}" "$@"
