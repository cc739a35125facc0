"""The Helm chart, validated without a cluster.

Renders helm/minimesh with Helm's real template engine for the default
values and every ci/*-values.yaml file, and checks what a user's cluster
would receive.
"""

import base64
import json
import os
import pathlib
import re
import subprocess
import tempfile

import helm_python
import kubernetes_validate
import pytest
import yaml

import crd_schemas
import test_image

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "minimesh"
NAMESPACE = "shop"
RELEASE = "shop"
KUBE_VERSION = "1.30.0"
# The shop's services, whom each calls and who may call it: the list `up` and the chart read too.
SHOP = {s["name"]: s for s in yaml.safe_load((CHART / "shop.yaml").read_text())["services"]}
SERVICES = list(SHOP)
CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
MATRIX = [("default", {})] + [(f.name, yaml.safe_load(f.read_text())) for f in CI_FILES]
# The minimesh image's binaries (Dockerfile): its ENTRYPOINT, the whole CLI, and the proxy alone,
# which the sidecars and the gateway run (`minimesh-proxy sidecar|gateway`, the same flags).
ENTRYPOINT = "/usr/local/bin/minimesh"
PROXY_COMMAND = "/usr/local/bin/minimesh-proxy"
# Their local builds: MINIMESH_BIN (tests/helm/run.sh sets it) and minimesh-proxy beside it.
BINARY = os.environ.get("MINIMESH_BIN", str(ROOT / "target" / "debug" / "minimesh"))


def fullname(values):
    """The chart's resource name prefix for these values (as its minimesh.fullname helper)."""
    if values.get("fullnameOverride"):
        return values["fullnameOverride"]
    name = values.get("nameOverride") or "minimesh"
    return RELEASE if name in RELEASE else f"{RELEASE}-{name}"


def effective(values):
    """The values a rendering sees: the chart's defaults merged with the given ones."""
    return helm_python.Chart.load(str(CHART)).merge_values(values)


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


def local_binary(name):
    """The local build of the image's /usr/local/bin/<name>: MINIMESH_BIN, or its sibling."""
    minimesh = pathlib.Path(BINARY)
    return minimesh if name == "minimesh" else minimesh.with_name(name)


def local_argv(container):
    """What a container of the minimesh image runs, its command (else the ENTRYPOINT) mapped to the
    local build of that binary, then its args."""
    command = container.get("command") or [ENTRYPOINT]
    name = command[0].removeprefix("/usr/local/bin/")
    assert command[0] in (ENTRYPOINT, PROXY_COMMAND, name) and name in ("minimesh", "minimesh-proxy"), \
        f"{container['name']}: {command[0]} is not in the image"
    binary = local_binary(name)
    if not binary.exists():
        pytest.fail(f"{binary} not built; tests/helm/run.sh builds it (cargo build --bins)")
    return [str(binary), *command[1:], *container.get("args", [])]


def storage(values):
    """Where the services keep their data for these values: sqlite, postgresql or external."""
    v = effective(values)
    if v["postgresql"]["enabled"]:
        return "postgresql"
    return "external" if v["externalDatabase"]["existingSecret"] else "sqlite"


def service_workloads(objects):
    """{service: its StatefulSet or Deployment}."""
    return {
        o["metadata"]["labels"]["app.kubernetes.io/component"]: o
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["labels"]["app.kubernetes.io/component"] in SERVICES
    }


def test_lint_is_clean():
    for name, values in MATRIX:
        report = helm_python.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version="v" + KUBE_VERSION)
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, f"{name}: {problems}"


def test_every_object_is_valid_kubernetes(rendering):
    """Strictly, against the Kubernetes schemas; custom resources (cert-manager, Prometheus
    Operator, Gateway API) against the schemas in crd_schemas.py, as strictly."""
    name, _, objects, hooks = rendering
    for obj in objects + hooks:
        if crd_schemas.is_custom(obj):
            crd_schemas.validate(obj)
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("kind", ["Certificate", "PodMonitor", "GRPCRoute"])
def test_custom_resource_schemas_refuse_a_misplaced_field(kind):
    """The CRD schemas are strict: a field in the wrong place fails, as the objects the chart
    renders must not."""
    values = yaml.safe_load((CHART / "ci" / "edge-values.yaml").read_text()) | {"metrics": {"podMonitor": {"enabled": True}}}
    [obj] = [o for o in install(values) if o["kind"] == kind]
    crd_schemas.validate(obj)
    obj["spec"]["selectr"] = {}
    with pytest.raises(crd_schemas.jsonschema.ValidationError):
        crd_schemas.validate(obj)


def test_every_service_pod_runs_the_service_and_its_sidecar(rendering):
    name, values, objects, _ = rendering
    native = values.get("mesh", {}).get("nativeSidecars", True)
    workloads = service_workloads(objects)
    assert sorted(workloads) == sorted(SERVICES)
    for service, sts in workloads.items():
        spec = sts["spec"]["template"]["spec"]
        assert [c["name"] for c in spec["containers"]][0] == service
        if native:
            sidecars = [c for c in spec.get("initContainers", []) if c["name"] == "sidecar"]
            assert sidecars and sidecars[0]["restartPolicy"] == "Always", f"{name}: {service} needs a native sidecar"
        else:
            assert "sidecar" in [c["name"] for c in spec["containers"]]
            assert not spec.get("initContainers")
        assert spec["serviceAccountName"] == f"{fullname(values)}-{service}", "the release's prefix, then the identity"
        if storage(values) == "sqlite":
            # SQLite is single-host: each pod owns a volume.
            assert sts["kind"] == "StatefulSet", f"{name}: {service}"
            assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
        else:
            assert sts["kind"] == "Deployment", f"{name}: {service}"
            assert not spec.get("volumes", []) or all(v["name"] != "data" for v in spec["volumes"])


def sidecar_configs(objects):
    for cm in by_kind(objects, "ConfigMap"):
        for key, text in cm.get("data", {}).items():
            if key in ("sidecar.yaml", "gateway.yaml"):
                yield cm, key, json.loads(text)


def test_sidecar_configs_match_the_services_and_policy(rendering):
    name, values, objects, _ = rendering
    services = {s["metadata"]["name"]: s for s in by_kind(objects, "Service")}
    # shop.yaml's allow-lists, each replaced by mesh.policy.<service> when set.
    policy = {name: s["allow"] for name, s in SHOP.items()} | values.get("mesh", {}).get("policy", {})
    trust_domain = values.get("mesh", {}).get("trustDomain", "minimesh.local")
    seen = set()
    for cm, key, config in sidecar_configs(objects):
        assert config["namespace"] == NAMESPACE and config["trustDomain"] == trust_domain
        if key == "sidecar.yaml":
            seen.add(config["service"])
            assert config["allow"] == policy[config["service"]]
        cluster_domain = effective(values)["clusterDomain"]
        for upstream, target in config["upstreams"].items():
            host, port = target["dns"].rsplit(":", 1)
            service_name = host.split(".")[0]
            # Absolute, with the cluster's domain: no search-path walk on each re-resolution.
            assert host == f"{service_name}.{NAMESPACE}.svc.{cluster_domain}.", f"{name}: {host}"
            svc = services.get(service_name)
            assert svc, f"{name}: upstream {upstream} points at missing Service {service_name}"
            assert svc["spec"]["clusterIP"] == "None", "discovery needs the headless Service"
            assert svc["spec"]["selector"]["app.kubernetes.io/component"] == upstream
            assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
        expected_upstreams = SHOP[config["service"]]["upstreams"] if key == "sidecar.yaml" else SERVICES
        assert sorted(config["upstreams"]) == sorted(expected_upstreams)
        # The proxy knows no protos: each upstream's gRPC package prefix is its route.
        assert config["routes"] == {SHOP[u]["route"]: u for u in expected_upstreams}
    assert seen == set(SERVICES)


def test_the_proxy_accepts_every_rendered_config(rendering):
    """The real binary parses each proxy's rendered configuration (`--check-config`): its ConfigMap
    and its container's whole environment (identity, expose, listeners), nothing added."""
    name, _, objects, _ = rendering
    configs = {(cm["metadata"]["name"], key): config for cm, key, config in sidecar_configs(objects)}
    checked = set()
    workloads = {id(spec): obj for obj, spec in pod_specs(objects)}
    for identity, spec, proxy in proxies(objects):
        env = {"PATH": os.environ.get("PATH", "")} | pod_env(workloads[id(spec)], proxy)
        config_dir, key = env["MINIMESH_CONFIG"].rsplit("/", 1)
        [mount] = [m for m in proxy["volumeMounts"] if m["mountPath"] == config_dir]
        [volume] = [vol for vol in spec["volumes"] if vol["name"] == mount["name"]]
        text = next(cm for cm in by_kind(objects, "ConfigMap") if cm["metadata"]["name"] == volume["configMap"]["name"])["data"][key]
        with tempfile.TemporaryDirectory() as tmp:
            env["MINIMESH_CONFIG"] = f"{tmp}/{key}"
            pathlib.Path(env["MINIMESH_CONFIG"]).write_text(text)
            # The binary the container runs (minimesh-proxy), with its own args.
            result = subprocess.run([*local_argv(proxy), "--check-config"], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{name} {identity}: {result.stderr}"
        resolved = json.loads(result.stdout)
        config = configs[(volume["configMap"]["name"], key)]
        assert sorted(resolved["upstreams"]) == sorted(config["upstreams"])
        assert resolved["namespace"] == NAMESPACE
        assert resolved["service"] == (None if identity == "gateway" else identity)
        checked.add(identity)
    assert checked == set(SERVICES + ["gateway"])


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
                if probe.get("exec"):
                    assert probe["exec"]["command"], f"{name}: {container['name']} {probe_kind} runs nothing"
                    continue
                action = probe.get("httpGet") or probe.get("grpc") or probe.get("tcpSocket")
                assert action, f"{name}: {container['name']} {probe_kind} has no action"
                assert action["port"] in declared_ports(container), (
                    f"{name}: {obj['metadata']['name']}/{container['name']} {probe_kind} port {action['port']} is not opened"
                )


def test_probes_go_to_the_sidecar_admin_port(rendering):
    """Kubelet never dials a service's own port (it is on loopback): the sidecar answers for it."""
    name, _, objects, _ = rendering
    for sts in service_workloads(objects).values():
        spec = sts["spec"]["template"]["spec"]
        where = f"{name}: {sts['metadata']['name']}"
        sidecar = next(c for c in all_containers(spec) if c["name"] == "sidecar")
        admin = next(p["containerPort"] for p in sidecar["ports"] if p["name"] == "admin")
        assert env_of(sidecar)["MINIMESH_ADMIN"] == f"0.0.0.0:{admin}", where
        expected = {"startupProbe": "/live", "livenessProbe": "/live", "readinessProbe": "/ready"}
        for kind, path in expected.items():
            probe = sidecar.get(kind)
            assert probe, f"{where}: the sidecar has no {kind}"
            assert probe["httpGet"] == {"path": path, "port": "admin"}, f"{where} {kind}"
        # The first certificate may take the proxy up to 60 s: the startup probe waits longer.
        startup = sidecar["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] > 60, where
        service = spec["containers"][0]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert kind not in service, f"{where}: the service container has a {kind}"
        for container in all_containers(spec):
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                action = container.get(kind, {})
                port = (action.get("grpc") or action.get("httpGet") or action.get("tcpSocket") or {}).get("port")
                assert port not in (8080, 9090, "grpc", "metrics"), f"{where}: {container['name']} {kind} dials the service"
    gateway = next(d for d in by_kind(objects, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway")
    proxy = gateway["spec"]["template"]["spec"]["containers"][0]
    assert proxy["startupProbe"]["httpGet"] == {"path": "/live", "port": "admin"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "admin"}


def env_of(container):
    """A container's plain environment: {name: value} (valueFrom entries map to their source)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"


def pod_identity(workload, ordinal=0):
    """(pod name, labels Kubernetes adds) of a workload's pod: a StatefulSet's pods are
    <name>-<ordinal> with the pod-index label (1.28+), a Deployment's have a generated suffix."""
    name = workload["metadata"]["name"]
    if workload["kind"] == "StatefulSet":
        return f"{name}-{ordinal}", {POD_INDEX_LABEL: str(ordinal)}
    return f"{name}-5f7d9c8b4-x{ordinal}q2z", {}


def pod_env(workload, container, ordinal=0):
    """A container's environment as kubelet gives it to one pod of the workload: downward API
    fields resolved, $(VAR) references to variables defined before expanded. Secret references are
    left out (None)."""
    pod_name, added = pod_identity(workload, ordinal)
    labels = workload["spec"]["template"]["metadata"]["labels"] | added
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1)) or m.group(0), item["value"])
        else:
            field = item["valueFrom"].get("fieldRef", {}).get("fieldPath")
            label = re.fullmatch(r"metadata\.labels\['(.+)'\]", field or "")
            if field == "metadata.namespace":
                value = NAMESPACE
            elif field == "metadata.name":
                value = pod_name
            elif label:
                value = labels.get(label.group(1), "")
            else:
                assert field is None, f"{container['name']}: unexpected fieldRef {field}"
                value = None
        if value is not None:
            env[item["name"]] = value
    return env


def test_services_listen_on_loopback_only(rendering):
    """Inside each service pod the service's gRPC and metrics ports are bound to 127.0.0.1, no
    container or Service publishes them, and the sidecar forwards to exactly that address."""
    name, _, objects, _ = rendering
    for sts in service_workloads(objects).values():
        spec = sts["spec"]["template"]["spec"]
        where = f"{name}: {sts['metadata']['name']}"
        service = env_of(spec["containers"][0])
        assert service["MINIMESH_LISTEN"] == "127.0.0.1:8080", where
        assert service["MINIMESH_METRICS_LISTEN"] == "127.0.0.1:9090", where
        sidecar = next(c for c in all_containers(spec) if c["name"] == "sidecar")
        assert env_of(sidecar)["MINIMESH_APP"] == service["MINIMESH_LISTEN"], where
        assert env_of(sidecar)["MINIMESH_OUTBOUND"].startswith("127.0.0.1:"), where
        assert int(env_of(sidecar)["MINIMESH_MAX_APP_STREAMS"]) >= 1, where
        for container in all_containers(spec):
            opened = {p["containerPort"] for p in container.get("ports", [])}
            assert not opened & {8080, 9090}, f"{where}: {container['name']} publishes a loopback port"
        if sts["metadata"]["labels"]["app.kubernetes.io/component"] == "order":
            # The order service reaches its peers through its sidecar only.
            assert service["MINIMESH_USER_ADDR"] == service["MINIMESH_PAYMENT_ADDR"] == "http://127.0.0.1:4140"
    for svc in by_kind(objects, "Service"):
        if svc["metadata"]["labels"]["app.kubernetes.io/component"] in SERVICES:
            targets = {p["targetPort"] for p in svc["spec"]["ports"]}
            assert targets <= {"mesh", "admin"}, f"{name}: {svc['metadata']['name']} targets {targets}"


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
            assert "resources" in container, where


def issuer_deployment(objects):
    found = [d for d in by_kind(objects, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "identity"]
    assert len(found) <= 1
    return found[0] if found else None


def proxies(objects):
    """(identity name, pod spec, proxy container) of every sidecar and gateway."""
    for obj, spec in pod_specs(objects):
        component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        if component in SERVICES:
            yield component, spec, next(c for c in all_containers(spec) if c["name"] == "sidecar")
        elif component == "gateway":
            yield component, spec, spec["containers"][0]


def test_proxies_run_minimesh_proxy_and_the_rest_the_image_s_minimesh(rendering):
    """Every sidecar and the gateway run the image's proxy-only binary (`minimesh-proxy sidecar`,
    `minimesh-proxy gateway`: less code resident in each proxy process than the whole CLI's); the
    services and the issuer run the image's ENTRYPOINT, minimesh. No other container sets a
    command, and each command is a file the Dockerfile puts into the image."""
    name, _, objects, hooks = rendering
    seen = set()
    for identity, _, proxy in proxies(objects):
        where = f"{name}: {identity}/{proxy['name']}"
        assert proxy["command"] == [PROXY_COMMAND], where
        assert proxy["args"] == ["gateway" if identity == "gateway" else "sidecar"], where
        seen.add(identity)
    assert seen == set(SERVICES + ["gateway"]), name
    for service, workload in service_workloads(objects).items():
        [app] = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == service]
        assert "command" not in app and app["args"] == ["service", service], f"{name}: {service}"
    issuer = issuer_deployment(objects)
    if issuer:
        [container] = issuer["spec"]["template"]["spec"]["containers"]
        assert "command" not in container and container["args"] == ["identity"], name
    commands = [c["command"] for _, spec in pod_specs(objects + hooks) for c in all_containers(spec) if "command" in c]
    assert commands == [[PROXY_COMMAND]] * len(commands) and len(commands) == len(list(proxies(objects))), name
    _, (_, runtime) = test_image.stages()
    in_image = {rest.split()[-1] for word, rest in runtime if word == "COPY"}
    assert {ENTRYPOINT, PROXY_COMMAND} <= in_image, in_image
    assert ("ENTRYPOINT", f'["{ENTRYPOINT}"]') in runtime


def uses_cert_manager(values):
    return values.get("certManager", {}).get("enabled", False)


def test_no_job_no_kubectl_no_per_identity_secret(rendering):
    """Nothing runs at install but the workloads: no hook Job, no kubectl image, no Role reading
    Secrets, and the only Secrets the chart writes are the trust anchor's and its PostgreSQL's."""
    name, values, objects, hooks = rendering
    assert not [o for o in objects + hooks if o["kind"] in ("Job", "CronJob", "Role", "RoleBinding")], name
    assert [h["metadata"]["annotations"]["helm.sh/hook"] for h in hooks] == ["test"], f"{name}: hooks other than the helm test"
    for obj, spec in pod_specs(objects + hooks):
        for container in all_containers(spec):
            assert "kubectl" not in container["image"], f"{name}: {obj['metadata']['name']} runs {container['image']}"
    secrets = [s["metadata"]["name"] for s in by_kind(objects, "Secret")]
    ta = effective(values)["identity"]["trustAnchor"]
    owned = not uses_cert_manager(values) and not ta["existingSecret"]
    expected = [f"{fullname(values)}-trust-anchor"] if owned else []
    if storage(values) == "postgresql":
        expected.append(f"{fullname(values)}-postgresql")
    assert sorted(secrets) == sorted(expected), f"{name}: {secrets}"
    for role in by_kind(objects, "ClusterRole"):
        for rule in role["rules"]:
            assert "secrets" not in rule["resources"], f"{name}: {role['metadata']['name']} reaches Secrets"


def test_issuer_deployment(rendering):
    """`minimesh identity` runs as its own Deployment with its own ServiceAccount, the trust anchor
    mounted, the configured TTL and trust domain, TLS on the Service port, probes on /live."""
    name, values, objects, _ = rendering
    deployment = issuer_deployment(objects)
    if uses_cert_manager(values):
        assert deployment is None, f"{name}: no issuer with cert-manager"
        return
    v = effective(values)
    assert deployment, f"{name}: no issuer Deployment"
    assert deployment["spec"]["replicas"] == v["identity"]["replicas"]
    spec = deployment["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == f"{fullname(values)}-identity"
    assert spec["serviceAccountName"] not in SERVICES + ["gateway"], "not a mesh identity"
    assert spec["automountServiceAccountToken"] is True, "TokenReview needs the issuer's own token"
    [container] = spec["containers"]
    assert container["args"] == ["identity"]
    env = env_of(container)
    assert env["MINIMESH_CERT_TTL"] == v["identity"]["certTTL"]
    assert env["MINIMESH_TRUST_DOMAIN"] == v["mesh"]["trustDomain"]
    assert env["MINIMESH_TOKEN_AUDIENCE"] == "minimesh-identity"
    assert "MINIMESH_BOOTSTRAP_KEY" not in env, "Kubernetes authenticates by ServiceAccount tokens"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {vol["name"]: vol for vol in spec["volumes"]}
    anchor = mounts["trust-anchor"]
    assert anchor["readOnly"] is True
    assert env["MINIMESH_CA_CERT"] == anchor["mountPath"] + "/tls.crt"
    assert env["MINIMESH_CA_KEY"] == anchor["mountPath"] + "/tls.key"
    secret = v["identity"]["trustAnchor"]["existingSecret"] or f"{fullname(values)}-trust-anchor"
    assert volumes["trust-anchor"]["secret"]["secretName"] == secret
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env["MINIMESH_LISTEN"] == f"0.0.0.0:{ports['identity']}"
    assert env["MINIMESH_METRICS_LISTEN"] == f"0.0.0.0:{ports['metrics']}"
    for kind in ("readinessProbe", "livenessProbe"):
        assert container[kind]["httpGet"] == {"path": "/live", "port": "metrics"}, kind
    service = next(s for s in by_kind(objects, "Service") if s["metadata"]["name"] == f"{fullname(values)}-identity")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    tls = next(p for p in service["spec"]["ports"] if p["port"] == 8443)
    assert tls["targetPort"] == "identity"


def test_issuer_may_create_token_reviews_and_nothing_else(rendering):
    name, values, objects, _ = rendering
    bindings = by_kind(objects, "ClusterRoleBinding")
    roles = {r["metadata"]["name"]: r for r in by_kind(objects, "ClusterRole")}
    if uses_cert_manager(values):
        assert not bindings and not roles, name
        return
    [binding] = bindings
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{fullname(values)}-identity", "namespace": NAMESPACE}]
    role = roles[binding["roleRef"]["name"]]
    assert binding["roleRef"]["kind"] == "ClusterRole"
    assert role["rules"] == [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]
    assert NAMESPACE in role["metadata"]["name"], "cluster-scoped names carry the namespace: releases must not collide"
    assert len(roles) == 1


def test_issuer_has_a_disruption_budget_when_replicated(rendering):
    name, values, objects, _ = rendering
    v = effective(values)
    budgets = [p for p in by_kind(objects, "PodDisruptionBudget") if p["metadata"]["labels"]["app.kubernetes.io/component"] == "identity"]
    wanted = not uses_cert_manager(values) and v["identity"]["replicas"] > 1 and v["podDisruptionBudget"]["enabled"]
    assert len(budgets) == (1 if wanted else 0), name
    if budgets:
        deployment = issuer_deployment(objects)
        assert budgets[0]["spec"]["minAvailable"] == 1
        assert budgets[0]["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_trust_anchor_comes_from_values_an_existing_secret_or_the_chart(rendering):
    """Where the trust anchor comes from, and that the release owns what it creates (a plain
    template, labelled, no hook); proxies get its certificate from a ConfigMap or the Secret's
    tls.crt item."""
    name, values, objects, hooks = rendering
    if uses_cert_manager(values):
        return
    ta = effective(values)["identity"]["trustAnchor"]
    configmaps = {c["metadata"]["name"]: c for c in by_kind(objects, "ConfigMap")}
    anchors = [s for s in by_kind(objects, "Secret") if s["metadata"]["labels"]["app.kubernetes.io/component"] == "trust-anchor"]
    if ta["existingSecret"]:
        assert not anchors and f"{fullname(values)}-trust-anchor" not in configmaps
        return
    [secret] = anchors
    assert secret["type"] == "kubernetes.io/tls"
    labels = secret["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == RELEASE and labels["app.kubernetes.io/managed-by"] == "Helm"
    assert "helm.sh/hook" not in secret["metadata"].get("annotations", {})
    cert = base64.b64decode(secret["data"]["tls.crt"]).decode()
    key = base64.b64decode(secret["data"]["tls.key"]).decode()
    assert configmaps[f"{fullname(values)}-trust-anchor"]["data"]["ca.crt"].strip() == cert.strip()
    if ta["certPem"]:
        assert cert == ta["certPem"] and key == ta["keyPem"]
    else:
        # Generated: a CA certificate with a PKCS#8 key the issuer can read.
        assert cert.startswith("-----BEGIN CERTIFICATE-----")
        assert key.startswith("-----BEGIN PRIVATE KEY-----")
    annotations = {
        obj["metadata"]["name"]: obj["spec"]["template"]["metadata"]["annotations"]["checksum/trust-anchor"]
        for obj, _ in pod_specs(objects)
        if obj["kind"] in ("Deployment", "StatefulSet") and obj["metadata"]["labels"]["app.kubernetes.io/component"] not in ("jaeger", "postgresql")
    }
    # One trust anchor per rendering: every pod rolls when it changes.
    assert len(set(annotations.values())) == 1, annotations


def test_only_the_issuer_holds_the_trust_anchor_key(rendering):
    name, values, objects, hooks = rendering
    if uses_cert_manager(values):
        return
    secret = effective(values)["identity"]["trustAnchor"]["existingSecret"] or f"{fullname(values)}-trust-anchor"
    for obj, spec in pod_specs(objects + hooks):
        component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        sources = []
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                sources.append(volume["secret"] | {"name": volume["secret"]["secretName"]})
            for source in volume.get("projected", {}).get("sources", []):
                if "secret" in source:
                    sources.append(source["secret"])
        for source in sources:
            if source["name"] != secret:
                continue
            keys = {item["key"] for item in source.get("items", [])}
            if component == "identity":
                assert keys == {"tls.crt", "tls.key"}
            else:
                assert keys == {"tls.crt"}, f"{name}: {obj['metadata']['name']} may read the trust anchor's key"
        if component != "identity":
            assert spec.get("automountServiceAccountToken") is False, f"{name}: {obj['metadata']['name']} gets an API token"


def test_proxies_get_their_certificates_from_the_issuer(rendering):
    """Every sidecar and the gateway: the issuer's address and TLS name, a projected token bound
    to the issuer's audience, the namespace from the downward API, the trust anchor's certificate,
    no certificate or key files, and a ServiceAccount named as the identity it asks for after the
    release's prefix, which the issuer is told to take off."""
    name, values, objects, _ = rendering
    v = effective(values)
    found = list(proxies(objects))
    assert sorted(identity for identity, _, _ in found) == sorted(SERVICES + ["gateway"])
    issuer = issuer_deployment(objects)
    if issuer:
        issuer_env = env_of(issuer["spec"]["template"]["spec"]["containers"][0])
        assert issuer_env["MINIMESH_SERVICE_ACCOUNT_PREFIX"] == f"{fullname(values)}-", name
    for identity, spec, proxy in found:
        where = f"{name}: {identity}"
        env = env_of(proxy)
        assert spec["serviceAccountName"] == f"{fullname(values)}-{identity}", where
        assert spec["automountServiceAccountToken"] is False, where
        mounts = {m["name"]: m for m in proxy["volumeMounts"]}
        volumes = {vol["name"]: vol for vol in spec["volumes"]}
        if uses_cert_manager(values):
            for var in ("MINIMESH_CA", "MINIMESH_CERT", "MINIMESH_KEY"):
                assert env[var].startswith(mounts["identity"]["mountPath"] + "/"), where
            assert volumes["identity"]["secret"]["secretName"] == f"{fullname(values)}-{identity}-identity", where
            assert "MINIMESH_IDENTITY_ADDR" not in env
            continue
        assert "MINIMESH_CERT" not in env and "MINIMESH_KEY" not in env, where
        issuer_env = env_of(issuer["spec"]["template"]["spec"]["containers"][0])
        addr = env["MINIMESH_IDENTITY_ADDR"]
        # The issuer's Service by its absolute name; TLS checks the name the issuer serves.
        assert addr == f"https://{fullname(values)}-identity.{NAMESPACE}.svc.{v['clusterDomain']}.:8443", where
        assert env["MINIMESH_IDENTITY_SERVER_NAME"] in issuer_env["MINIMESH_SERVER_NAMES"].split(","), where
        assert env["MINIMESH_IDENTITY_SERVER_NAME"] == f"{fullname(values)}-identity.{NAMESPACE}.svc"
        assert f"{fullname(values)}-identity.{NAMESPACE}.svc.{v['clusterDomain']}" in issuer_env["MINIMESH_SERVER_NAMES"].split(",")
        assert env["MINIMESH_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, where
        token_dir, token_file = env["MINIMESH_IDENTITY_TOKEN_FILE"].rsplit("/", 1)
        [mount] = [m for m in mounts.values() if m["mountPath"] == token_dir]
        assert mount["readOnly"] is True, where
        [source] = volumes[mount["name"]]["projected"]["sources"]
        assert source["serviceAccountToken"] == {
            "audience": issuer_env["MINIMESH_TOKEN_AUDIENCE"], "expirationSeconds": 3600, "path": token_file,
        }, where
        ca_dir, ca_file = env["MINIMESH_CA"].rsplit("/", 1)
        [mount] = [m for m in mounts.values() if m["mountPath"] == ca_dir]
        [source] = volumes[mount["name"]]["projected"]["sources"]
        existing = v["identity"]["trustAnchor"]["existingSecret"]
        if existing:
            assert source == {"secret": {"name": existing, "items": [{"key": "tls.crt", "path": ca_file}]}}, where
        else:
            assert source == {"configMap": {"name": f"{fullname(values)}-trust-anchor", "items": [{"key": "ca.crt", "path": ca_file}]}}, where


def test_cert_manager_issues_every_identity_instead(rendering):
    name, values, objects, _ = rendering
    # Mesh identities (a SPIFFE URI each), not the edge certificate (gateway.tls).
    certs = [c for c in by_kind(objects, "Certificate") if c["spec"].get("uris")]
    if not uses_cert_manager(values):
        assert not certs
        return
    v = effective(values)
    trust_domain = v["mesh"]["trustDomain"]
    mounted = {vol["secret"]["secretName"] for _, spec, _ in proxies(objects) for vol in spec["volumes"] if vol["name"] == "identity"}
    assert {c["spec"]["secretName"] for c in certs} == mounted
    for cert in certs:
        identity = cert["metadata"]["labels"]["app.kubernetes.io/component"]
        assert cert["spec"]["uris"] == [f"spiffe://{trust_domain}/ns/{NAMESPACE}/sa/{identity}"]
        assert set(cert["spec"]["usages"]) >= {"server auth", "client auth"}
        assert cert["spec"]["duration"] == v["identity"]["certTTL"]
        assert cert["spec"]["renewBeforePercentage"] == 30


def test_gateway_exposes_only_the_configured_services(rendering):
    name, values, objects, _ = rendering
    expose = effective(values)["gateway"]["expose"]
    _, _, gateway = next(p for p in proxies(objects) if p[0] == "gateway")
    assert env_of(gateway)["MINIMESH_EXPOSE"] == ",".join(expose)
    if "gateway" not in values:
        # By default payment is internal.
        assert expose == ["user", "order"]


def test_tracing_points_every_component_at_the_collector(rendering):
    name, values, objects, _ = rendering
    services = {s["metadata"]["name"] for s in by_kind(objects, "Service")}
    jaeger = values.get("jaeger", {}).get("enabled", False)
    external = values.get("tracing", {}).get("otlpEndpoint", "")
    for obj, spec in pod_specs(objects):
        if obj["metadata"]["labels"].get("app.kubernetes.io/component") in ("jaeger", "test", "postgresql"):
            continue
        for container in all_containers(spec):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            assert env.get("OTEL_SERVICE_NAME", "").startswith("minimesh-"), f"{name}: {container['name']}"
            if jaeger:
                host = endpoint.removeprefix("http://").rsplit(":", 1)[0]
                cluster_domain = effective(values)["clusterDomain"]
                assert host.split(".")[0] in services and endpoint.endswith(":4317"), f"{name}: {endpoint}"
                assert host == f"{host.split('.')[0]}.{NAMESPACE}.svc.{cluster_domain}.", f"{name}: {endpoint}"
            elif external:
                assert endpoint == external
            else:
                assert endpoint is None


def selects(selector, labels):
    """Whether a Kubernetes label selector matches a set of labels."""
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
        if expr["operator"] == "Exists" and value is None:
            return False
        if expr["operator"] == "DoesNotExist" and value is not None:
            return False
    return True


def release_pods(objects):
    """{component: pod template labels} of every workload of the release."""
    return {
        obj["metadata"]["labels"]["app.kubernetes.io/component"]: obj["spec"]["template"]["metadata"]["labels"]
        for obj in objects if obj["kind"] in ("Deployment", "StatefulSet")
    }


def normalise(rule, peers_key, pods, values_peers):
    """A rule as (ports, who): who is "anywhere", the release components a pod-selector peer
    admits, or "values" when its peers are exactly the ones given in values."""
    ports = frozenset(p["port"] for p in rule["ports"])
    peers = rule.get(peers_key)
    if not peers:
        return ports, "anywhere"
    if peers in values_peers:
        return ports, "values"
    components = set()
    for peer in peers:
        assert set(peer) == {"podSelector"}, f"unexpected peer {peer}"
        components |= {c for c, labels in pods.items() if selects(peer["podSelector"], labels)}
    return ports, frozenset(components)


MESH = frozenset(SERVICES + ["gateway"])


def test_network_policies_rule_by_rule(rendering):
    """Every rule of every policy, in both directions: the mesh port from the release's mesh pods
    only, the issuer from mesh pods only, the gateway port from gatewayFrom (anyone by default),
    admin and metrics ports from adminFrom only (none by default), the chart's PostgreSQL from the
    service pods only, and nothing else in; out, the services reach their database (the chart's
    server, or databaseTo on databasePorts) and the PostgreSQL server reaches nothing."""
    name, values, objects, _ = rendering
    policies = by_kind(objects, "NetworkPolicy")
    v = effective(values)
    np = v["networkPolicy"]
    if not np["enabled"]:
        assert not policies
        return
    pods = release_pods(objects)
    issuer = not uses_cert_manager(values)
    prefix = fullname(values) + "-"
    by_name = {p["metadata"]["name"].removeprefix(prefix): p for p in policies}
    mode = storage(values)
    assert sorted(by_name) == sorted(["services", "gateway"] + (["identity"] if issuer else []) + (["postgresql"] if mode == "postgresql" else []))
    targets = {"services": set(SERVICES), "gateway": {"gateway"}, "identity": {"identity"}, "postgresql": {"postgresql"}}
    given = [peers for peers in (np["adminFrom"], np["gatewayFrom"], np["databaseTo"]) if peers]

    def expected_admin(port):
        return {(frozenset({port}), "values")} if np["adminFrom"] else set()

    expected_in = {
        "services": {(frozenset({4143}), MESH)} | expected_admin(4191),
        "gateway": {(frozenset({50051}), "values" if np["gatewayFrom"] else "anywhere")} | expected_admin(4191),
        "identity": {(frozenset({8443}), MESH)} | expected_admin(9090),
        "postgresql": {(frozenset({5432}), frozenset(SERVICES))},
    }
    tracing = set()
    if v["jaeger"]["enabled"]:
        tracing = {(frozenset({4317}), frozenset({"jaeger"}))}
    elif v["tracing"]["otlpEndpoint"]:
        tracing = {(frozenset({4317}), "anywhere")}
    dns = {(frozenset({53}), "anywhere")}
    proxy_out = {(frozenset({4143}), MESH)} | ({(frozenset({8443}), frozenset({"identity"}))} if issuer else set()) | dns | tracing
    database = set()
    if mode == "postgresql":
        database = {(frozenset({5432}), frozenset({"postgresql"}))}
    elif mode == "external":
        database = {(frozenset(np["databasePorts"]), "values" if np["databaseTo"] else "anywhere")}
    expected_out = {
        "services": proxy_out | database,
        "gateway": proxy_out,
        "identity": {(frozenset(np["apiServerPorts"]), "anywhere")} | dns | tracing,
        "postgresql": set(),
    }
    for short, policy in by_name.items():
        spec = policy["spec"]
        where = f"{name}: {policy['metadata']['name']}"
        assert spec["policyTypes"] == ["Ingress", "Egress"], where
        assert {c for c, labels in pods.items() if selects(spec["podSelector"], labels)} == targets[short], where
        ingress = [normalise(r, "from", pods, given) for r in spec["ingress"]]
        assert len(ingress) == len(set(ingress)) and set(ingress) == expected_in[short], where
        for rule in spec["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            if ports & {4191, 9090}:
                assert rule["from"] == np["adminFrom"], f"{where}: admin port from {rule.get('from')}"
            assert not ports & {8080, 9090} or short == "identity", f"{where}: a service's loopback port is opened"
        egress = [normalise(r, "to", pods, given) for r in spec["egress"]]
        assert len(egress) == len(set(egress)) and set(egress) == expected_out[short], where


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
    assert "The gateway serves user, order;" in notes
    assert "the issuer shop-minimesh-identity signs workload certificates valid 24h" in notes
    notes = render_all({"gateway": {"expose": ["order"]}, "certManager": {"enabled": True}, "identity": {"certTTL": "48h"}})["minimesh/templates/NOTES.txt"]
    assert "The gateway serves order;" in notes
    assert "cert-manager Certificates (issuer Issuer/minimesh-ca), valid 48h" in notes
    assert "shop-minimesh-identity" not in notes


@pytest.mark.parametrize(
    "bad",
    [
        {"services": {"user": {"replicas": "three", "resources": {}}, "order": {"replicas": 1, "resources": {}}, "payment": {"replicas": 1, "resources": {}}}},
        {"gateway": {"service": {"type": "Ingress"}}},
        {"unknownKey": True},
        {"mesh": {"traffic": {"maxAttempts": 0}}},
        {"tracing": {"otlpEndpoint": "collector:4317"}},
        {"certManager": {"issuerRef": {"name": "x", "kind": "Secret"}}},
        {"certificates": {"days": 365}},
        {"gateway": {"expose": ["inventory"]}},
        {"gateway": {"expose": ["user", "user"]}},
        {"identity": {"certTTL": "5s"}},
        {"identity": {"certTTL": "1d"}},
        {"identity": {"replicas": 0}},
        {"identity": {"trustAnchor": {"existingSecret": "mesh-ca", "certPem": "-----BEGIN CERTIFICATE-----"}}},
        {"identity": {"trustAnchor": {"existingSecret": "Not A Name"}}},
        {"networkPolicy": {"adminFrom": [{"podSelector": {}, "ports": [{"port": 4191}]}]}},
        {"networkPolicy": {"gatewayFrom": [{}]}},
        {"networkPolicy": {"apiServerPorts": []}},
        {"sidecar": {"maxAppStreams": 0}},
        {"sidecar": {"maxAppStreams": "many"}},
        {"sidecar": {"stallTimeout": "30"}},
        {"sidecar": {"streamWindow": 1024}},
        {"sidecar": {"connectionWindow": 4294967296}},
    ],
)
def test_schema_refuses_bad_values(bad):
    with pytest.raises(helm_python.HelmError):
        install(bad)


TEST_CA = yaml.safe_load((CHART / "ci" / "trust-anchor-values.yaml").read_text())["identity"]["trustAnchor"]


@pytest.mark.parametrize(
    "anchor, message",
    [
        ({"certPem": TEST_CA["certPem"]}, "give both certPem and keyPem"),
        ({"keyPem": TEST_CA["keyPem"]}, "give both certPem and keyPem"),
        ({"certPem": TEST_CA["certPem"], "keyPem": "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n"}, "PKCS#8"),
        ({"certPem": "not a certificate", "keyPem": TEST_CA["keyPem"]}, "PEM certificate"),
    ],
)
def test_a_trust_anchor_the_issuer_could_not_read_fails_the_render(anchor, message):
    """The issuer reads PKCS#8 keys only: say so at `helm install`, not in a crash-looping pod."""
    with pytest.raises(helm_python.HelmError) as err:
        install({"identity": {"trustAnchor": anchor}})
    assert message in str(err.value)


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


def sidecar_config_of(objects, service):
    [config] = [c for _, key, c in sidecar_configs(objects) if key == "sidecar.yaml" and c["service"] == service]
    return config


def test_mesh_policy_replaces_a_services_default_and_keeps_the_others():
    objects = install({"mesh": {"policy": {"user": ["gateway"]}}})
    assert sidecar_config_of(objects, "user")["allow"] == ["gateway"]
    for service in set(SERVICES) - {"user"}:
        assert sidecar_config_of(objects, service)["allow"] == SHOP[service]["allow"], service


@pytest.mark.parametrize("values, message", [
    ({"services": {"inventory": {"replicas": 1}}}, "services.inventory: inventory is not a service of the shop"),
    ({"mesh": {"policy": {"inventory": ["gateway"]}}}, "mesh.policy.inventory: inventory is not a service of the shop"),
    ({"gateway": {"expose": ["inventory"]}}, "gateway.expose: inventory is not a service of the shop"),
])
def test_values_naming_a_service_the_shop_does_not_list_fail_the_render(values, message):
    with pytest.raises(helm_python.HelmError) as err:
        install(values)
    assert message in str(err.value)


def test_a_fourth_service_needs_only_its_entry_in_shop_yaml():
    """A copy of the chart whose shop.yaml lists an inventory service (calling payment, which
    admits it): no values for it, yet it gets a workload with defaults, its sidecar config, the
    gateway's route, its database, and a place in the NetworkPolicies."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = pathlib.Path(tmp) / "minimesh"
        subprocess.run(["cp", "-r", str(CHART), str(copy)], check=True)
        shop = yaml.safe_load((copy / "shop.yaml").read_text())
        for service in shop["services"]:
            if service["name"] == "payment":
                service["allow"].append("inventory")
        shop["services"].append({"name": "inventory", "route": "shop.inventory.", "upstreams": ["payment"], "allow": ["gateway"]})
        (copy / "shop.yaml").write_text(yaml.safe_dump(shop))
        values = {"networkPolicy": {"enabled": True}, "postgresql": {"enabled": True}}
        config = helm_python.Config(storage_driver="memory", namespace=NAMESPACE)
        manifest = config.install(str(copy), RELEASE, values, dry_run="client")["manifest"]
        objects = [d for d in yaml.safe_load_all(manifest) if d]
    inventory = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == f"{RELEASE}-minimesh-inventory")
    assert inventory["spec"]["replicas"] == 1
    [app] = [c for c in inventory["spec"]["template"]["spec"]["containers"] if c["name"] == "inventory"]
    assert app["args"] == ["service", "inventory"]
    assert app["resources"] == effective({})["services"]["user"]["resources"], "the defaults of values.yaml's services"
    env = {e["name"]: e for e in app["env"]}
    assert env["MINIMESH_PAYMENT_ADDR"]["value"] == "http://127.0.0.1:4140"
    assert env["MINIMESH_DB"]["valueFrom"]["secretKeyRef"]["key"] == "inventory-url"
    own = sidecar_config_of(objects, "inventory")
    assert (own["allow"], sorted(own["upstreams"]), own["routes"]) == (["gateway"], ["payment"], {"shop.payment.": "payment"})
    assert sidecar_config_of(objects, "payment")["allow"] == ["order", "inventory"]
    [gateway] = [c for _, key, c in sidecar_configs(objects) if key == "gateway.yaml"]
    assert gateway["routes"]["shop.inventory."] == "inventory" and "inventory" in gateway["upstreams"]
    policies = {p["metadata"]["name"]: p for p in by_kind(objects, "NetworkPolicy")}
    selected = policies[f"{RELEASE}-minimesh-services"]["spec"]["podSelector"]["matchExpressions"][1]["values"]
    assert selected == SERVICES + ["inventory"]
    peers = policies[f"{RELEASE}-minimesh-services"]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][1]["values"]
    assert "inventory" in peers and "gateway" in peers


def test_sidecar_max_app_streams_reaches_every_sidecar():
    """sidecar.maxAppStreams is the bound each sidecar puts on calls into its service."""
    objects = install({"sidecar": {"maxAppStreams": 64, "stallTimeout": "10s"}})
    workloads = service_workloads(objects)
    assert workloads
    for sts in workloads.values():
        spec = sts["spec"]["template"]["spec"]
        sidecar = next(c for c in all_containers(spec) if c["name"] == "sidecar")
        assert env_of(sidecar)["MINIMESH_MAX_APP_STREAMS"] == "64", sts["metadata"]["name"]
        assert env_of(sidecar)["MINIMESH_STALL_TIMEOUT"] == "10s", sts["metadata"]["name"]


def test_windows_reach_every_proxy():
    """sidecar.streamWindow and connectionWindow reach every sidecar and the gateway, as bytes."""
    objects = install({"sidecar": {"streamWindow": 262144, "connectionWindow": 67108864}})
    proxies = []
    for sts in service_workloads(objects).values():
        spec = sts["spec"]["template"]["spec"]
        proxies.append(next(c for c in all_containers(spec) if c["name"] == "sidecar"))
    gateway = next(d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-gateway"))
    proxies.append(gateway["spec"]["template"]["spec"]["containers"][0])
    assert len(proxies) >= 4
    for proxy in proxies:
        env = env_of(proxy)
        assert (env["MINIMESH_STREAM_WINDOW"], env["MINIMESH_CONNECTION_WINDOW"]) == ("262144", "67108864")
    defaults = env_of(next(c for c in all_containers(service_workloads(install({})).popitem()[1]["spec"]["template"]["spec"]) if c["name"] == "sidecar"))
    assert (defaults["MINIMESH_STREAM_WINDOW"], defaults["MINIMESH_CONNECTION_WINDOW"]) == ("65536", "16777216")
