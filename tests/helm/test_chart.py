"""The Helm chart, validated without a cluster.

Renders helm/minimesh with Helm's real template engine for the default
values and every ci/*-values.yaml file, and checks what a user's cluster
would receive.
"""

import json
import os
import pathlib
import subprocess
import tempfile

import helm_python
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "minimesh"
NAMESPACE = "shop"
RELEASE = "shop"
KUBE_VERSION = "1.30.0"
SERVICES = ["user", "order", "payment"]
CERT_MANAGER_KINDS = {"Certificate"}
CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
MATRIX = [("default", {})] + [(f.name, yaml.safe_load(f.read_text())) for f in CI_FILES]


def install(values):
    """What `helm install --dry-run` would apply (schema checked, hooks excluded)."""
    config = helm_python.Config(storage_driver="memory", namespace=NAMESPACE)
    release = config.install(str(CHART), RELEASE, values, dry_run="client")
    return [d for d in yaml.safe_load_all(release["manifest"]) if d]


def render_all(values):
    """Every template, hooks and NOTES included: {template path: text}."""
    chart = helm_python.Chart.load(str(CHART))
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def hook_objects(values):
    objects = []
    for path, text in render_all(values).items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc and "helm.sh/hook" in doc.get("metadata", {}).get("annotations", {}):
                objects.append(doc)
    return objects


@pytest.fixture(scope="module", params=MATRIX, ids=[name for name, _ in MATRIX])
def rendering(request):
    name, values = request.param
    return name, values, install(values), hook_objects(values)


def by_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def pod_specs(objects):
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield obj, obj["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":
            yield obj, obj["spec"]


def all_containers(spec):
    return spec.get("initContainers", []) + spec["containers"]


def test_lint_is_clean():
    for name, values in MATRIX:
        report = helm_python.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version="v" + KUBE_VERSION)
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, f"{name}: {problems}"


def test_every_object_is_valid_kubernetes(rendering):
    name, _, objects, hooks = rendering
    for obj in objects + hooks:
        if obj["kind"] in CERT_MANAGER_KINDS:
            # Not in the Kubernetes schemas: check the fields cert-manager needs.
            spec = obj["spec"]
            assert obj["apiVersion"] == "cert-manager.io/v1"
            assert spec["secretName"] and spec["issuerRef"]["name"] and spec["uris"]
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_every_service_pod_runs_the_service_and_its_sidecar(rendering):
    name, values, objects, _ = rendering
    native = values.get("mesh", {}).get("nativeSidecars", True)
    statefulsets = {o["metadata"]["labels"]["app.kubernetes.io/component"]: o for o in by_kind(objects, "StatefulSet")}
    assert sorted(statefulsets) == sorted(SERVICES)
    for service, sts in statefulsets.items():
        spec = sts["spec"]["template"]["spec"]
        assert [c["name"] for c in spec["containers"]][0] == service
        if native:
            sidecars = [c for c in spec.get("initContainers", []) if c["name"] == "sidecar"]
            assert sidecars and sidecars[0]["restartPolicy"] == "Always", f"{name}: {service} needs a native sidecar"
        else:
            assert "sidecar" in [c["name"] for c in spec["containers"]]
            assert not spec.get("initContainers")
        assert spec["serviceAccountName"] == service, "the ServiceAccount name is the identity"
        assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def sidecar_configs(objects):
    for cm in by_kind(objects, "ConfigMap"):
        for key, text in cm.get("data", {}).items():
            if key in ("sidecar.yaml", "gateway.yaml"):
                yield cm, key, json.loads(text)


def test_sidecar_configs_match_the_services_and_policy(rendering):
    name, values, objects, _ = rendering
    services = {s["metadata"]["name"]: s for s in by_kind(objects, "Service")}
    policy = values.get("mesh", {}).get("policy", {"user": ["order", "gateway"], "order": ["gateway"], "payment": ["order", "gateway"]})
    trust_domain = values.get("mesh", {}).get("trustDomain", "minimesh.local")
    seen = set()
    for cm, key, config in sidecar_configs(objects):
        assert config["namespace"] == NAMESPACE and config["trustDomain"] == trust_domain
        if key == "sidecar.yaml":
            seen.add(config["service"])
            assert config["allow"] == policy[config["service"]]
        for upstream, target in config["upstreams"].items():
            host, port = target["dns"].rsplit(":", 1)
            service_name = host.split(".")[0]
            assert host == f"{service_name}.{NAMESPACE}.svc.cluster.local"
            svc = services.get(service_name)
            assert svc, f"{name}: upstream {upstream} points at missing Service {service_name}"
            assert svc["spec"]["clusterIP"] == "None", "discovery needs the headless Service"
            assert svc["spec"]["selector"]["app.kubernetes.io/component"] == upstream
            assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
        expected_upstreams = {"order": ["payment", "user"]}.get(config.get("service"), [])
        if key == "gateway.yaml":
            expected_upstreams = sorted(SERVICES)
        assert sorted(config["upstreams"]) == sorted(expected_upstreams)
    assert seen == set(SERVICES)


def test_the_proxy_accepts_every_rendered_config(rendering):
    """The real binary parses each ConfigMap the chart renders (`--check-config`)."""
    binary = os.environ.get("MINIMESH_BIN", str(ROOT / "target" / "debug" / "minimesh"))
    if not pathlib.Path(binary).exists():
        pytest.fail(f"{binary} not built; tests/helm/run.sh builds it")
    name, _, objects, _ = rendering
    for cm, key, config in sidecar_configs(objects):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(cm["data"][key])
        command = "sidecar" if key == "sidecar.yaml" else "gateway"
        result = subprocess.run(
            [binary, command, "--check-config", "--config", f.name, "--ca", "unused", "--cert", "unused", "--key", "unused"],
            capture_output=True, text=True, timeout=30,
        )
        os.unlink(f.name)
        assert result.returncode == 0, f"{name} {cm['metadata']['name']}: {result.stderr}"
        resolved = json.loads(result.stdout)
        assert sorted(resolved["upstreams"]) == sorted(config["upstreams"])


def declared_ports(container):
    ports = container.get("ports", [])
    return {p["containerPort"] for p in ports} | {p.get("name") for p in ports}


def test_every_probe_points_at_a_port_the_container_opens(rendering):
    name, _, objects, _ = rendering
    for obj, spec in pod_specs(objects):
        for container in all_containers(spec):
            for probe_kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                probe = container.get(probe_kind)
                if not probe:
                    continue
                action = probe.get("httpGet") or probe.get("grpc") or probe.get("tcpSocket")
                assert action, f"{name}: {container['name']} {probe_kind} has no action"
                assert action["port"] in declared_ports(container), (
                    f"{name}: {obj['metadata']['name']}/{container['name']} {probe_kind} port {action['port']} is not opened"
                )
    # The admin endpoints are real: sidecars probe /live and /ready.
    for sts in by_kind(objects, "StatefulSet"):
        spec = sts["spec"]["template"]["spec"]
        sidecar = next(c for c in all_containers(spec) if c["name"] == "sidecar")
        assert sidecar["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert sidecar["livenessProbe"]["httpGet"]["path"] == "/live"
        service = spec["containers"][0]
        assert service["readinessProbe"]["grpc"]["port"] == 8080


def test_every_container_is_hardened(rendering):
    name, _, objects, hooks = rendering
    for obj, spec in pod_specs(objects + hooks):
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, f"{name}: {obj['metadata']['name']}"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        for container in all_containers(spec):
            ctx = container.get("securityContext", {})
            where = f"{name}: {obj['metadata']['name']}/{container['name']}"
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
            if obj["kind"] != "Job" and container["name"] not in ("health-through-gateway",):
                assert "resources" in container, where


def test_identities_and_certificates(rendering):
    name, values, objects, hooks = rendering
    accounts = {sa["metadata"]["name"] for sa in by_kind(objects, "ServiceAccount")}
    assert set(SERVICES + ["gateway"]) <= accounts
    secrets_mounted = set()
    for obj, spec in pod_specs(objects):
        for volume in spec.get("volumes", []):
            if volume["name"] == "identity":
                secrets_mounted.add(volume["secret"]["secretName"])
    cert_manager = values.get("certManager", {}).get("enabled", False)
    if cert_manager:
        certs = by_kind(objects, "Certificate")
        assert {c["spec"]["secretName"] for c in certs} == secrets_mounted
        trust_domain = values.get("mesh", {}).get("trustDomain", "minimesh.local")
        for cert in certs:
            identity = cert["metadata"]["labels"]["app.kubernetes.io/component"]
            assert cert["spec"]["uris"] == [f"spiffe://{trust_domain}/ns/{NAMESPACE}/sa/{identity}"]
            assert set(cert["spec"]["usages"]) >= {"server auth", "client auth"}
        assert not [h for h in hooks if h["kind"] == "Job"], "no certificate Job with cert-manager"
    else:
        jobs = [h for h in hooks if h["kind"] == "Job"]
        assert len(jobs) == 1
        assert "pre-install" in jobs[0]["metadata"]["annotations"]["helm.sh/hook"]
        script = jobs[0]["spec"]["template"]["spec"]["containers"][0]["args"][0]
        for secret in secrets_mounted:
            identity = secret.removesuffix("-identity").rsplit("-", 1)[1]
            assert f"--name \"$name\"" in script and identity in script
        roles = [h for h in hooks if h["kind"] == "Role"]
        assert roles and roles[0]["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create", "patch"]}]
        existing = values.get("certificates", {}).get("existingCASecret")
        if existing:
            assert f"CA={existing}" in script


def test_tracing_points_every_component_at_the_collector(rendering):
    name, values, objects, _ = rendering
    services = {s["metadata"]["name"] for s in by_kind(objects, "Service")}
    jaeger = values.get("jaeger", {}).get("enabled", False)
    external = values.get("tracing", {}).get("otlpEndpoint", "")
    for obj, spec in pod_specs(objects):
        if obj["metadata"]["labels"].get("app.kubernetes.io/component") in ("jaeger", "test"):
            continue
        for container in all_containers(spec):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            assert env.get("OTEL_SERVICE_NAME", "").startswith("minimesh-"), f"{name}: {container['name']}"
            if jaeger:
                host = endpoint.removeprefix("http://").split(":")[0]
                assert host in services and endpoint.endswith(":4317"), f"{name}: {endpoint}"
            elif external:
                assert endpoint == external
            else:
                assert endpoint is None


def test_network_policy_allows_only_mesh_ports(rendering):
    name, values, objects, _ = rendering
    policies = by_kind(objects, "NetworkPolicy")
    if not values.get("networkPolicy", {}).get("enabled"):
        assert not policies
        return
    services_policy = next(p for p in policies if p["metadata"]["name"].endswith("-services"))
    mesh_rule = services_policy["spec"]["ingress"][0]
    assert [p["port"] for p in mesh_rule["ports"]] == [4143]
    assert "podSelector" in mesh_rule["from"][0], "mesh port only from mesh pods"
    gateway_policy = next(p for p in policies if p["metadata"]["name"].endswith("-gateway"))
    assert 50051 in [p["port"] for p in gateway_policy["spec"]["ingress"][0]["ports"]]


def test_helm_test_checks_health_through_the_gateway(rendering):
    name, values, objects, hooks = rendering
    tests = [h for h in hooks if h["metadata"]["annotations"]["helm.sh/hook"] == "test"]
    assert len(tests) == 1
    gateway = next(s for s in by_kind(objects, "Service") if s["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway")
    port = gateway["spec"]["ports"][0]["port"]
    assert f"-addr={gateway['metadata']['name']}:{port}" in tests[0]["spec"]["containers"][0]["args"]


def test_notes_tell_how_to_reach_the_mesh():
    notes = render_all({"jaeger": {"enabled": True}})["minimesh/templates/NOTES.txt"]
    assert "port-forward svc/shop-minimesh-gateway 50051:50051" in notes
    assert "grpcurl -plaintext 127.0.0.1:50051 list" in notes
    assert "16686:16686" in notes


@pytest.mark.parametrize(
    "bad",
    [
        {"services": {"user": {"replicas": "three", "resources": {}}, "order": {"replicas": 1, "resources": {}}, "payment": {"replicas": 1, "resources": {}}}},
        {"gateway": {"service": {"type": "Ingress"}}},
        {"unknownKey": True},
        {"mesh": {"traffic": {"maxAttempts": 0}}},
        {"tracing": {"otlpEndpoint": "collector:4317"}},
        {"certManager": {"issuerRef": {"name": "x", "kind": "Secret"}}},
    ],
)
def test_schema_refuses_bad_values(bad):
    with pytest.raises(helm_python.HelmError):
        install(bad)


def leaf_paths(tree, prefix=()):
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from leaf_paths(value, prefix + (key,))
    else:
        yield prefix


def test_every_value_is_documented_and_exercised():
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    ci_values = [yaml.safe_load(f.read_text()) for f in CI_FILES]

    def set_in(tree, path):
        for key in path:
            if not isinstance(tree, dict) or key not in tree:
                return False
            tree = tree[key]
        return True

    # Lists of services share one shape; a service's keys count if set on any service.
    missing = []
    for path in leaf_paths(defaults):
        candidates = [path]
        if path[0] == "services":
            candidates = [("services", s) + path[2:] for s in SERVICES]
        if path[:2] == ("mesh", "policy"):
            candidates = [path]
        if not any(set_in(v, c) for v in ci_values for c in candidates):
            missing.append(".".join(path))
    assert not missing, f"values no ci/*-values.yaml file sets: {missing}"

    # Every key down to the second level carries a comment (on it or just above).
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if not stripped or stripped.startswith("#") or ":" not in stripped or indent > 2:
            continue
        above = lines[max(0, i - 3):i]
        if not any(l.lstrip().startswith("#") for l in above) and "#" not in line:
            undocumented.append(stripped.split(":")[0])
    assert not undocumented, f"undocumented values: {undocumented}"
