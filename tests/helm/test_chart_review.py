"""What a review of the chart found (issue 16), each fixed and checked here: the chart as a
subchart, pod metadata and scheduling per component, a PodMonitor, image digests and a global
registry, the cluster domain, the supported Kubernetes versions, the `helm test` pod, the pods'
names and ordinals, the edge (Ingress, GRPCRoute, TLS) and Jaeger v2.
"""

import json
import os
import pathlib
import subprocess
import tempfile

import helm_python
import pytest
import yaml

import crd_schemas
import test_chart as chart
from test_chart import NAMESPACE, RELEASE, all_containers, by_kind, effective, env_of, install, pod_env, pod_specs, selects
from test_identity_live import FakeApiServer

CI = chart.CHART / "ci"
PLACEMENT = yaml.safe_load((CI / "placement-values.yaml").read_text())
EDGE = yaml.safe_load((CI / "edge-values.yaml").read_text())
WITH_EVERYTHING = {"postgresql": {"enabled": True}, "jaeger": {"enabled": True}}
DIGEST = "sha256:" + "ab" * 32


def render_error(values):
    with pytest.raises(helm_python.HelmError) as err:
        install(values)
    return str(err.value)


def workloads(objects):
    """{component: workload} of every Deployment and StatefulSet."""
    return {o["metadata"]["labels"]["app.kubernetes.io/component"]: o for o in objects if o["kind"] in ("Deployment", "StatefulSet")}


def helm_test_pod(values):
    [pod] = [h for h in chart.hook_objects(values) if h["kind"] == "Pod"]
    return pod


# The chart as a dependency ------------------------------------------------------------------------

def umbrella(tmp, values_yaml=""):
    """A parent chart depending on this one through file://, its dependency built as `helm
    dependency update` does (the chart packaged into charts/)."""
    parent = pathlib.Path(tmp) / "shop-platform"
    parent.mkdir()
    (parent / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "shop-platform", "version": "1.0.0",
        "dependencies": [{"name": "minimesh", "version": helm_python.Chart.load(str(chart.CHART)).version,
                          "repository": f"file://{chart.CHART}"}],
    }))
    (parent / "values.yaml").write_text(values_yaml)
    (parent / "templates").mkdir()
    helm_python.dependency_update(str(parent), skip_refresh=True)
    assert [p.name for p in (parent / "charts").iterdir()] == ["minimesh-0.1.0.tgz"]
    return parent


def install_chart(path, values=None):
    config = helm_python.Config(storage_driver="memory", namespace=NAMESPACE)
    manifest = config.install(str(path), RELEASE, values or {}, dry_run="client")["manifest"]
    return [d for d in yaml.safe_load_all(manifest) if d]


def test_an_umbrella_chart_renders_with_no_values():
    """Helm hands every subchart a `global` block: a strict schema must accept it."""
    with tempfile.TemporaryDirectory() as tmp:
        parent = umbrella(tmp)
        objects = install_chart(parent)
        assert sorted(workloads(objects)) == sorted(chart.SERVICES + ["gateway", "identity"])
        for obj in objects:
            chart.kubernetes_validate.validate(obj, chart.KUBE_VERSION, strict=True)
        report = helm_python.lint(str(parent), {}, strict=True, namespace=NAMESPACE, with_subcharts=True,
                                  kube_version="v" + chart.KUBE_VERSION)
        assert not [m for m in report["messages"] if m["severity"] >= 2] + report["errors"], report


def test_an_umbrella_chart_passes_globals_and_values_down():
    """The parent's global.imageRegistry reaches every image, its other globals are ignored, and
    its minimesh: block configures the subchart (still checked by the subchart's schema)."""
    values = yaml.safe_dump({
        "global": {"imageRegistry": "mirror.example.com", "storageClass": "fast", "someOtherChart": {"x": 1}},
        "minimesh": {"gateway": {"expose": ["order"]}, "jaeger": {"enabled": True}},
    })
    with tempfile.TemporaryDirectory() as tmp:
        parent = umbrella(tmp, values)
        objects = install_chart(parent)
        images = {c["image"] for _, spec in pod_specs(objects) for c in all_containers(spec)}
        assert images and all(i.startswith("mirror.example.com/") for i in images), images
        gateway = workloads(objects)["gateway"]["spec"]["template"]["spec"]["containers"][0]
        assert env_of(gateway)["MINIMESH_EXPOSE"] == "order"
        with pytest.raises(helm_python.HelmError) as err:
            install_chart(parent, {"minimesh": {"gateway": {"expose": ["inventory"]}}})
        assert "minimesh" in str(err.value)


# Pod metadata and scheduling ----------------------------------------------------------------------

COMPONENT_VALUES = {**{s: ("services", s) for s in chart.SERVICES},
                    "gateway": ("gateway",), "identity": ("identity",), "postgresql": ("postgresql",), "jaeger": ("jaeger",)}


def component_values(values, component):
    v = effective(values)
    for key in COMPONENT_VALUES[component]:
        v = v[key]
    return v


def test_pod_labels_and_annotations_chart_wide_and_per_component():
    objects = install(PLACEMENT)
    found = workloads(objects)
    assert sorted(found) == sorted(COMPONENT_VALUES)
    for component, workload in found.items():
        own = component_values(PLACEMENT, component)
        metadata = workload["spec"]["template"]["metadata"]
        expected_labels = PLACEMENT["podLabels"] | own["podLabels"]
        assert metadata["labels"].items() >= expected_labels.items(), component
        assert metadata["labels"].items() >= workload["spec"]["selector"]["matchLabels"].items(), component
        assert metadata["annotations"].items() >= (PLACEMENT["podAnnotations"] | own["podAnnotations"]).items(), component
        # The workload's own labels are the chart's, not the pods' extras.
        assert not workload["metadata"]["labels"].keys() & expected_labels.keys(), component


def test_the_chart_labels_and_checksums_win_over_pod_values():
    """podLabels cannot unhook a pod from its selector, nor podAnnotations stop a config roll."""
    hijack = {"podLabels": {"app.kubernetes.io/component": "other", "app.kubernetes.io/instance": "other"},
              "podAnnotations": {"checksum/config": "pinned", "checksum/trust-anchor": "pinned"}}
    objects = install({"gateway": hijack, "podLabels": {"app.kubernetes.io/name": "other"}})
    for component, workload in workloads(objects).items():
        metadata = workload["spec"]["template"]["metadata"]
        assert selects(workload["spec"]["selector"], metadata["labels"]), component
        assert metadata["labels"]["app.kubernetes.io/name"] == "minimesh"
        assert "pinned" not in metadata.get("annotations", {}).values(), component


def test_scheduling_per_component_over_chart_wide_defaults():
    """Each of nodeSelector, tolerations, affinity, topologySpreadConstraints: the component's own
    when set, else the chart-wide one; for every workload and the helm test pod."""
    objects = install(PLACEMENT)
    pods = {c: w["spec"]["template"]["spec"] for c, w in workloads(objects).items()}
    pods["test"] = helm_test_pod(PLACEMENT)["spec"]
    for component, spec in pods.items():
        own = PLACEMENT["tests"] if component == "test" else component_values(PLACEMENT, component)
        for key in ("nodeSelector", "tolerations", "affinity"):
            assert spec.get(key) == (own.get(key) or PLACEMENT[key]), f"{component} {key}"
        constraints = own.get("topologySpreadConstraints") or PLACEMENT["topologySpreadConstraints"]
        assert len(spec["topologySpreadConstraints"]) == len(constraints), component
        for given, rendered in zip(constraints, spec["topologySpreadConstraints"]):
            assert rendered.items() >= given.items(), component
            if "labelSelector" not in given:
                # Spread against the component's own pods, and the pod is one of them.
                labels = (helm_test_pod(PLACEMENT)["metadata"]["labels"] if component == "test" else
                          workloads(objects)[component]["spec"]["template"]["metadata"]["labels"])
                assert rendered["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
                assert selects(rendered["labelSelector"], labels), component


def test_no_scheduling_values_no_scheduling_fields():
    for _, spec in pod_specs(install(WITH_EVERYTHING) + [helm_test_pod(WITH_EVERYTHING)]):
        assert not spec.keys() & {"nodeSelector", "tolerations", "affinity", "topologySpreadConstraints", "imagePullSecrets"}


SERVICES_BASE = {"order": {"replicas": 1, "resources": {}}, "payment": {"replicas": 1, "resources": {}}}


@pytest.mark.parametrize("good, bad", [
    ({"tolerations": [{"key": "a", "operator": "Exists"}]}, {"tolerations": [{"key": "a", "operator": "Maybe"}]}),
    ({"gateway": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}]}},
     {"gateway": {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone"}]}}),
    ({"identity": {"affinity": {"nodeAffinity": {}}}}, {"identity": {"affinity": {"nodeAffinty": {}}}}),
    ({"services": {"user": {"replicas": 1, "resources": {}, "podLabels": {"tier": "3"}}} | SERVICES_BASE},
     {"services": {"user": {"replicas": 1, "resources": {}, "podLabels": {"tier": 3}}} | SERVICES_BASE}),
    ({"podLabels": {"example.com/label": "x"}}, {"podLabels": {"bad label!": "x"}}),
    ({"jaeger": {"nodeSelector": {"pool": "true"}}}, {"jaeger": {"nodeSelector": {"pool": True}}}),
    ({"tests": {"tolerations": [{"operator": "Exists"}]}}, {"tests": {"tolerations": "all"}}),
])
def test_schema_takes_placement_and_refuses_it_malformed(good, bad):
    install(good)
    render_error(bad)


# PodMonitor ---------------------------------------------------------------------------------------

def declared_port_names(spec):
    return {p["name"] for c in all_containers(spec) for p in c.get("ports", []) if "name" in p}


def test_pod_monitor_scrapes_every_admin_port():
    """Off by default. When on: the pods it selects are exactly the proxies and the issuer, each
    declares a port of some endpoint (native sidecars' ports included), and every endpoint is
    /metrics on a port that is the admin or metrics listener of what serves it."""
    assert not by_kind(install({}), "PodMonitor")
    for values in (PLACEMENT, {"metrics": {"podMonitor": {"enabled": True}}, "mesh": {"nativeSidecars": False}}):
        objects = install(values)
        [monitor] = by_kind(objects, "PodMonitor")
        crd_schemas.validate(monitor)
        pm = effective(values)["metrics"]["podMonitor"]
        assert monitor["metadata"]["labels"].items() >= pm["labels"].items()
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        endpoints = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
        assert all(e["path"] == "/metrics" and e.get("interval") == pm["interval"] for e in endpoints.values())
        selected = {c: w for c, w in workloads(objects).items()
                    if selects(monitor["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])}
        assert sorted(selected) == sorted(chart.SERVICES + ["gateway", "identity"])
        for component, workload in selected.items():
            spec = workload["spec"]["template"]["spec"]
            scraped = declared_port_names(spec) & endpoints.keys()
            assert scraped, f"{component}: no port the PodMonitor scrapes"
            for container in all_containers(spec):
                for port in container.get("ports", []):
                    if port.get("name") in scraped:
                        env = env_of(container)
                        listener = env.get("MINIMESH_ADMIN") or env.get("MINIMESH_METRICS_LISTEN")
                        assert listener == f"0.0.0.0:{port['containerPort']}", f"{component}/{container['name']}"
        for component in set(workloads(objects)) - set(selected):
            assert not declared_port_names(workloads(objects)[component]["spec"]["template"]["spec"]) & {"admin"}


# Images ---------------------------------------------------------------------------------------------

def images(objects):
    return {obj["metadata"]["labels"]["app.kubernetes.io/component"]: {c["image"] for c in all_containers(spec)}
            for obj, spec in pod_specs(objects)}


def test_images_by_tag_by_digest_and_from_a_registry():
    default = images(install(WITH_EVERYTHING) + [helm_test_pod(WITH_EVERYTHING)])
    assert default["order"] == default["gateway"] == default["identity"] == {"minimesh:0.1.0"}
    assert default["postgresql"] == {"postgres:15.16-trixie"}
    assert default["jaeger"] == {"jaegertracing/jaeger:2.19.0"}
    assert default["test"] == {"ghcr.io/grpc-ecosystem/grpc-health-probe:v0.4.35"}

    pinned = WITH_EVERYTHING | {"image": {"registry": "registry.example.com", "tag": "1.2.3", "digest": DIGEST},
                                "tests": {"image": {"digest": DIGEST}}}
    found = images(install(pinned) + [helm_test_pod(pinned)])
    assert found["user"] == {f"registry.example.com/minimesh@{DIGEST}"}, "a digest wins over the tag"
    assert found["test"] == {f"ghcr.io/grpc-ecosystem/grpc-health-probe@{DIGEST}"}

    mirrored = pinned | {"global": {"imageRegistry": "mirror.internal:5000/proxy"}}
    found = images(install(mirrored) + [helm_test_pod(mirrored)])
    assert found["user"] == {f"mirror.internal:5000/proxy/minimesh@{DIGEST}"}
    assert found["postgresql"] == {"mirror.internal:5000/proxy/postgres:15.16-trixie"}
    assert found["jaeger"] == {"mirror.internal:5000/proxy/jaegertracing/jaeger:2.19.0"}
    assert found["test"] == {f"mirror.internal:5000/proxy/grpc-ecosystem/grpc-health-probe@{DIGEST}"}


def test_image_pull_secrets_chart_and_global_on_every_pod():
    values = WITH_EVERYTHING | {"imagePullSecrets": [{"name": "mine"}], "global": {"imagePullSecrets": [{"name": "platform"}, {"name": "mine"}]}}
    for obj, spec in pod_specs(install(values) + [helm_test_pod(values)]):
        assert spec["imagePullSecrets"] == [{"name": "mine"}, {"name": "platform"}], obj["metadata"]["name"]


@pytest.mark.parametrize("good, bad", [
    ({"image": {"digest": DIGEST}}, {"image": {"digest": "sha256:abc"}}),
    ({"image": {"digest": DIGEST}}, {"image": {"digest": "ab" * 32}}),
    ({"image": {"tag": "1.2.3-rc.1"}}, {"image": {"tag": "latest please"}}),
    ({"global": {"imageRegistry": "mirror.example.com"}}, {"global": {"imageRegistry": "https://mirror.example.com"}}),
    ({"jaeger": {"image": {"tag": "2.20.0"}}}, {"jaeger": {"image": "jaegertracing/all-in-one:1.62.0"}}),
])
def test_schema_takes_image_values_and_refuses_bad_ones(good, bad):
    install(good)
    render_error(bad)


# The cluster domain ---------------------------------------------------------------------------------

def test_every_name_proxies_dial_is_absolute_in_the_cluster_domain():
    """Upstreams, the issuer and the trace collector, by <svc>.<ns>.svc.<clusterDomain>. (the
    final dot: no search-path walk, so re-resolution asks one name); the issuer's certificate
    names and cert-manager's DNS names follow the domain too."""
    for domain in ("cluster.local", "corp.k8s.internal"):
        values = {"clusterDomain": domain, "jaeger": {"enabled": True}}
        objects = install(values)
        suffix = f".{NAMESPACE}.svc.{domain}."
        dialled = []
        for cm, key, config in chart.sidecar_configs(objects):
            dialled += [u["dns"].rsplit(":", 1)[0] for u in config["upstreams"].values()]
        for _, spec in pod_specs(objects):
            for container in all_containers(spec):
                env = env_of(container)
                for var in ("MINIMESH_IDENTITY_ADDR", "OTEL_EXPORTER_OTLP_ENDPOINT"):
                    if var in env:
                        dialled.append(env[var].split("://")[1].rsplit(":", 1)[0])
        assert len(dialled) > 8 and all(host.endswith(suffix) for host in dialled), dialled
        issuer = workloads(objects)["identity"]["spec"]["template"]["spec"]["containers"][0]
        assert f"{RELEASE}-minimesh-identity{suffix.rstrip('.')}" in env_of(issuer)["MINIMESH_SERVER_NAMES"].split(",")
        certs = by_kind(install(values | {"certManager": {"enabled": True}}), "Certificate")
        assert all(c["spec"]["dnsNames"][-1].endswith(f".svc.{domain}") for c in certs)
        assert "cluster.local" not in json.dumps(objects) or domain == "cluster.local"


def test_schema_refuses_a_cluster_domain_with_a_dot_or_scheme():
    install({"clusterDomain": "corp.internal"})
    for bad in ("cluster.local.", ".cluster.local", "https://cluster.local", ""):
        render_error({"clusterDomain": bad})


# Kubernetes versions -------------------------------------------------------------------------------

def render_for(kube_version, values):
    """`helm install --dry-run=server` against an API server reporting kube_version: Helm checks
    Chart.yaml's kubeVersion and the templates see .Capabilities.KubeVersion."""
    api = FakeApiServer(kube_version=kube_version)
    try:
        return api.render(values)
    finally:
        api.close()


def test_kubernetes_1_28_runs_without_native_sidecars():
    objects = render_for("1.28.3", {"mesh": {"nativeSidecars": False}})
    for component in chart.SERVICES:
        spec = workloads(objects)[component]["spec"]["template"]["spec"]
        assert not spec.get("initContainers") and "sidecar" in [c["name"] for c in spec["containers"]]
    with pytest.raises(helm_python.HelmError) as err:
        render_for("1.28.3", {})
    assert "mesh.nativeSidecars=true needs Kubernetes 1.29" in str(err.value)
    assert "set mesh.nativeSidecars=false" in str(err.value)
    assert workloads(render_for("1.29.0", {}))["order"]["spec"]["template"]["spec"]["initContainers"]
    with pytest.raises(helm_python.HelmError) as err:
        render_for("1.27.9", {"mesh": {"nativeSidecars": False}})
    assert "kubeVersion" in str(err.value) or "incompatible" in str(err.value)


# The helm test pod -----------------------------------------------------------------------------------

def test_the_helm_test_pod_has_resources_pull_secrets_and_scheduling():
    pod = helm_test_pod({})
    [container] = pod["spec"]["containers"]
    assert container["resources"] == effective({})["tests"]["resources"]
    values = {"imagePullSecrets": [{"name": "regcred"}], "nodeSelector": {"pool": "general"},
              "tolerations": [{"key": "dedicated", "operator": "Exists"}],
              "tests": {"resources": {"requests": {"cpu": "1m"}}, "nodeSelector": {"pool": "tests"}}}
    spec = helm_test_pod(values)["spec"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["nodeSelector"] == {"pool": "tests"}, "its own selector over the chart-wide one"
    assert spec["tolerations"] == values["tolerations"], "the chart-wide tolerations when it has none"
    assert spec["containers"][0]["resources"] == effective(values)["tests"]["resources"]
    assert spec["containers"][0]["resources"]["requests"]["cpu"] == "1m"


# Which pod is which ----------------------------------------------------------------------------------

MINIMESH_CONTAINERS = set(chart.SERVICES) | {"sidecar", "gateway", "identity"}


def test_every_minimesh_container_knows_its_pod_and_statefulset_pods_their_ordinal():
    """MINIMESH_REPLICA is a number to the binary: a StatefulSet pod's ordinal (the pod-index
    label), never set for Deployment pods, whose names carry no ordinal. Every minimesh container
    gets its pod's name (downward API) and exports it as k8s.pod.name with its traces."""
    for values in ({}, {"postgresql": {"enabled": True}}):
        for component, workload in workloads(install(values)).items():
            for container in all_containers(workload["spec"]["template"]["spec"]):
                if container["name"] not in MINIMESH_CONTAINERS:
                    continue
                where = f"{component}/{container['name']}"
                raw = env_of(container)
                assert raw["MINIMESH_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}, where
                if workload["kind"] == "StatefulSet":
                    assert raw["MINIMESH_REPLICA"] == {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}, where
                else:
                    assert "MINIMESH_REPLICA" not in raw, where
                env = pod_env(workload, container, ordinal=2)
                pod_name = chart.pod_identity(workload, 2)[0]
                assert env["MINIMESH_POD_NAME"] == pod_name
                assert f"k8s.pod.name={pod_name}" in env["OTEL_RESOURCE_ATTRIBUTES"].split(","), where
                assert f"k8s.namespace.name={NAMESPACE}" in env["OTEL_RESOURCE_ATTRIBUTES"].split(","), where
                if workload["kind"] == "StatefulSet":
                    assert env["MINIMESH_REPLICA"] == "2"


@pytest.mark.parametrize("binary", ["minimesh-proxy", "minimesh"])
def test_the_binary_takes_the_ordinal_and_refuses_a_pod_name_as_replica(binary):
    """Why Deployment pods get no MINIMESH_REPLICA: the binary reads it as an integer. Both the
    proxy binary the chart's sidecars run and `minimesh sidecar`, which stays runnable by hand."""
    path = chart.local_binary(binary)
    if not path.exists():
        pytest.fail(f"{path} not built; tests/helm/run.sh builds it")
    base = {"PATH": os.environ.get("PATH", ""), "MINIMESH_CA": "/dev/null", "MINIMESH_CERT": "/dev/null", "MINIMESH_KEY": "/dev/null"}
    ok = subprocess.run([path, "sidecar", "--service", "user", "--check-config"], env=base | {"MINIMESH_REPLICA": "2"},
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([path, "sidecar", "--service", "user", "--check-config"],
                             env=base | {"MINIMESH_REPLICA": "shop-minimesh-user-5f7d9c8b4-x0q2z"}, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "--replica" in refused.stderr


# Two releases ------------------------------------------------------------------------------------------



def named_objects(objects):
    return {(o["kind"], o["metadata"]["name"]) for o in objects}


@pytest.mark.parametrize("values", [{}, WITH_EVERYTHING | {"networkPolicy": {"enabled": True}, "metrics": {"podMonitor": {"enabled": True}}} | EDGE,
                                    {"certManager": {"enabled": True}}], ids=["default", "everything", "cert-manager"])
def test_two_releases_in_one_namespace_share_no_object(values):
    """Every object of two releases in one namespace is named after its release, the mesh
    identities' ServiceAccounts included (`<release>-minimesh-<identity>`): the issuer takes the
    release's prefix off to form `spiffe://<td>/ns/<ns>/sa/<identity>`."""
    config = helm_python.Config(storage_driver="memory", namespace=NAMESPACE)
    rendered = {}
    for release in ("shop", "staging"):
        manifest = config.install(str(chart.CHART), release, values, dry_run="client")["manifest"]
        rendered[release] = [d for d in yaml.safe_load_all(manifest) if d]
    shared = named_objects(rendered["shop"]) & named_objects(rendered["staging"])
    assert shared == set(), shared


def test_releases_of_one_name_in_two_namespaces_share_no_cluster_object():
    names = []
    for namespace in ("shop", "staging"):
        config = helm_python.Config(storage_driver="memory", namespace=namespace)
        manifest = config.install(str(chart.CHART), RELEASE, {}, dry_run="client")["manifest"]
        names.append({(o["kind"], o["metadata"]["name"]) for o in yaml.safe_load_all(manifest)
                      if o and o["kind"] in ("ClusterRole", "ClusterRoleBinding")})
    assert len(names[0]) == 2 and not names[0] & names[1]


# The edge ------------------------------------------------------------------------------------------------

def gateway_service(objects):
    return next(s for s in by_kind(objects, "Service") if s["metadata"]["name"].endswith("-gateway"))


def test_the_gateway_service_says_it_speaks_h2c():
    service = gateway_service(install({"gateway": {"service": {"annotations": {"a": "b"}}}}))
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["appProtocol"] == "kubernetes.io/h2c"
    assert service["metadata"]["annotations"] == {"a": "b"}


def test_no_edge_objects_by_default():
    objects = install({})
    assert not [o for o in objects if o["kind"] in ("Ingress", "GRPCRoute", "Certificate")]


def test_ingress_with_a_cert_manager_certificate_and_a_grpc_route():
    objects = install(EDGE)
    service = gateway_service(objects)
    [ingress] = by_kind(objects, "Ingress")
    [route] = by_kind(objects, "GRPCRoute")
    [cert] = by_kind(objects, "Certificate")
    gw = EDGE["gateway"]
    # The Ingress: the class, gRPC backend annotations, TLS with the Secret cert-manager writes.
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["metadata"]["annotations"] == gw["ingress"]["annotations"]
    assert ingress["spec"]["tls"] == [{"hosts": gw["ingress"]["hosts"], "secretName": gw["tls"]["secretName"]}]
    assert [r["host"] for r in ingress["spec"]["rules"]] == gw["ingress"]["hosts"]
    for rule in ingress["spec"]["rules"]:
        [path] = rule["http"]["paths"]
        assert (path["path"], path["pathType"]) == ("/", "Prefix")
        backend = path["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"]["name"] in [p["name"] for p in service["spec"]["ports"]]
    # The certificate: every edge host name, its own issuer (not the mesh CA's), no SPIFFE URI.
    assert cert["spec"]["secretName"] == gw["tls"]["secretName"]
    assert sorted(cert["spec"]["dnsNames"]) == sorted(set(gw["ingress"]["hosts"] + gw["grpcRoute"]["hostnames"]))
    assert cert["spec"]["issuerRef"]["name"] == "letsencrypt-prod" and "uris" not in cert["spec"]
    assert "server auth" in cert["spec"]["usages"] and "client auth" not in cert["spec"]["usages"]
    # The GRPCRoute: the given parents and hosts, every call to the gateway Service.
    assert route["spec"]["parentRefs"] == gw["grpcRoute"]["parentRefs"]
    assert route["spec"]["hostnames"] == gw["grpcRoute"]["hostnames"]
    [rule] = route["spec"]["rules"]
    assert rule == {"backendRefs": [{"name": service["metadata"]["name"], "port": service["spec"]["ports"][0]["port"]}]}
    for obj in (route, cert):
        crd_schemas.validate(obj)
    chart.kubernetes_validate.validate(ingress, chart.KUBE_VERSION, strict=True)


def test_edge_tls_from_an_existing_secret_or_the_default_certificate_name():
    existing = install({"gateway": {"ingress": {"enabled": True, "hosts": ["grpc.example.com"]}, "tls": {"secretName": "edge-cert"}}})
    [ingress] = by_kind(existing, "Ingress")
    assert ingress["spec"]["tls"] == [{"hosts": ["grpc.example.com"], "secretName": "edge-cert"}]
    assert not by_kind(existing, "Certificate")
    issued = install({"gateway": {"ingress": {"enabled": True, "hosts": ["grpc.example.com"]}, "tls": {"certManager": {"enabled": True}}}})
    [cert] = by_kind(issued, "Certificate")
    [ingress] = by_kind(issued, "Ingress")
    assert cert["spec"]["secretName"] == ingress["spec"]["tls"][0]["secretName"] == f"{RELEASE}-minimesh-gateway-tls"
    plain = install({"gateway": {"ingress": {"enabled": True}}})
    [ingress] = by_kind(plain, "Ingress")
    assert "tls" not in ingress["spec"] and "host" not in ingress["spec"]["rules"][0]


@pytest.mark.parametrize("values, message", [
    ({"gateway": {"tls": {"certManager": {"enabled": True}}}}, "gateway.tls.certManager.enabled needs host names"),
    ({"gateway": {"ingress": {"enabled": True}, "tls": {"secretName": "edge"}}}, "needs gateway.ingress.hosts"),
    ({"gateway": {"grpcRoute": {"enabled": True}}}, "needs gateway.grpcRoute.parentRefs"),
])
def test_edge_values_that_cannot_work_fail_the_render(values, message):
    assert message in render_error(values)


# Jaeger v2 -----------------------------------------------------------------------------------------------

def test_jaeger_v2_with_its_config_and_a_cap_on_traces_in_memory():
    values = {"jaeger": {"enabled": True, "maxTraces": 2500}}
    objects = install(values)
    deployment = workloads(objects)["jaeger"]
    spec = deployment["spec"]["template"]["spec"]
    [container] = spec["containers"]
    repository, tag = container["image"].rsplit(":", 1)
    assert repository == "jaegertracing/jaeger" and tag.startswith("2."), "Jaeger v2, not the v1 all-in-one"
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}, "one in-memory store at a time"
    # Its configuration file comes from the ConfigMap the pod mounts.
    [arg] = container["args"]
    config_path = arg.removeprefix("--config=")
    config_dir, key = config_path.rsplit("/", 1)
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == config_dir]
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    [configmap] = [c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"]]
    config = yaml.safe_load(configmap["data"][key])
    assert deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    # Memory store, capped by the value; the pipeline writes to it and the UI reads it.
    backends = config["extensions"]["jaeger_storage"]["backends"]
    [(store, backend)] = backends.items()
    assert backend == {"memory": {"max_traces": 2500}}
    assert config["exporters"]["jaeger_storage_exporter"]["trace_storage"] == store
    assert config["extensions"]["jaeger_query"]["storage"]["traces"] == store
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"] and pipeline["exporters"] == ["jaeger_storage_exporter"]
    assert set(config["service"]["extensions"]) == set(config["extensions"])
    # Every listener the Service, the UI and the probes use is open on all addresses.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == f"0.0.0.0:{ports['otlp-grpc']}"
    assert config["extensions"]["jaeger_query"]["http"]["endpoint"] == f"0.0.0.0:{ports['ui']}"
    assert config["extensions"]["healthcheckv2"]["http"]["endpoint"] == f"0.0.0.0:{ports['health']}"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/status", "port": "health"}
    service = next(s for s in by_kind(objects, "Service") if s["metadata"]["name"].endswith("-jaeger"))
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    # v1 settings would be ignored by v2: none are left.
    assert not [e for e in container.get("env", []) if e["name"] in ("COLLECTOR_OTLP_ENABLED", "MEMORY_MAX_TRACES", "SPAN_STORAGE_TYPE")]


def test_schema_caps_jaeger_max_traces():
    install({"jaeger": {"maxTraces": 5000}})
    render_error({"jaeger": {"maxTraces": 0}})
    render_error({"jaeger": {"maxTraces": "lots"}})


def test_the_gateway_can_serve_tls_itself_from_the_edge_secret():
    """gateway.tls.atGateway: the gateway's own listener serves TLS with the edge Secret, which it
    re-reads when renewed (sidecar/tests/edge.rs proves the binary side); the Service then no
    longer claims h2c. Without a Secret to serve, the render fails saying what to set."""
    objects = install({"gateway": {"tls": {"atGateway": True, "secretName": "edge-cert"}}})
    spec = workloads(objects)["gateway"]["spec"]["template"]["spec"]
    container = spec["containers"][0]
    env = env_of(container)
    assert env["MINIMESH_EDGE_TLS_CERT"] == "/var/run/minimesh/edge-tls/tls.crt"
    assert env["MINIMESH_EDGE_TLS_KEY"] == "/var/run/minimesh/edge-tls/tls.key"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["edge-tls"] == "/var/run/minimesh/edge-tls"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["edge-tls"]["secret"]["secretName"] == "edge-cert"
    grpc = next(p for p in gateway_service(objects)["spec"]["ports"] if p["name"] == "grpc")
    assert "appProtocol" not in grpc
    default = workloads(install({}))["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert "MINIMESH_EDGE_TLS_CERT" not in env_of(default)
    assert "atGateway needs the edge certificate" in render_error({"gateway": {"tls": {"atGateway": True}}})
