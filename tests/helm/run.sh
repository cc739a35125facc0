#!/usr/bin/env bash
# Validates the Helm chart without a cluster: renders it with Helm's own
# engine (helm-python-sdk) for the default values and every ci/*-values.yaml,
# lints it, checks every object against the Kubernetes schemas, runs the
# chart's behaviour tests, and runs the rendered pods themselves (test_pods.py:
# network namespaces, so as root). Installs what it needs into target/helm-venv.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/target/helm-venv"
requirements="$root/tests/helm/requirements.txt"
# Reinstalled whenever requirements.txt changes.
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/pytest" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  echo "$want" > "$stamp"
fi
# The sidecar configs the chart renders are checked, and the pods run, by the real binary.
if [ -z "${MINIMESH_BIN:-}" ]; then
  if [ ! -x "$root/target/debug/minimesh" ]; then
    (cd "$root" && cargo build --quiet --bin minimesh)
  fi
  export MINIMESH_BIN="$root/target/debug/minimesh"
fi
# Helm wants a writable home for its caches.
export HOME="${HOME:-$(mktemp -d)}"
[ -w "$HOME" ] || export HOME="$(mktemp -d)"
cd "$root"
exec "$venv/bin/pytest" -q tests/helm "$@"
