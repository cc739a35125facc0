"""The chart's identity wiring, run for real.

A tiny kubelet stand-in lays out each rendered pod's volumes (ConfigMaps, Secrets, projected
ServiceAccount tokens) in a temporary directory, maps every listen address to a free loopback
port, resolves `<service>.<namespace>.svc` through the rendered Services, and starts the real
binary each container's command names (`minimesh`; `minimesh-proxy` for the proxies) with its
rendered environment: the issuer with the chart's trust anchor, every sidecar and the gateway with
their projected tokens. The Kubernetes API is the one
piece that cannot run here: a local HTTPS stand-in answers TokenReviews (and, for `lookup`, a
plain HTTP stand-in answers Helm's discovery and GET of the trust anchor Secret).
"""

import base64
import http.server
import json
import os
import pathlib
import re
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request

import helm_python
import pytest
import yaml

import test_chart as chart
from podrunner.kubeapi import TokenReviewApi

BINARY = os.environ.get("MINIMESH_BIN", str(chart.ROOT / "target" / "debug" / "minimesh"))
# The gateway's own TLS listener needs an edge certificate Secret that a user or cert-manager makes;
# sidecar/tests/edge.rs covers that listener, so those renderings are not run here.
ISSUER_RENDERINGS = [(n, v) for n, v in chart.MATRIX
                     if not v.get("certManager", {}).get("enabled")
                     and not v.get("gateway", {}).get("tls", {}).get("atGateway")]
DEADLINE_S = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, deadline_s=DEADLINE_S):
    """Polls check() until it returns a truthy value; fails naming what never happened (what may
    be a callable, so that logs are read at the failure)."""
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.1)
    pytest.fail(f"{what() if callable(what) else what} within {deadline_s}s (last error: {last})")


class Kubelet:
    """Runs rendered pods as local processes (one replica of each workload)."""

    def __init__(self, objects, workdir, secrets, api, cluster_domain="cluster.local"):
        self.objects = objects
        self.cluster_domain = cluster_domain
        self.dir = workdir
        self.secrets = secrets  # Secrets that exist in the "cluster": rendered ones plus given ones
        self.api = api
        self.ports = {}  # (component, containerPort) -> loopback port
        self.processes = []
        self.configmaps = {c["metadata"]["name"]: c["data"] for c in chart.by_kind(objects, "ConfigMap")}
        self.services = {s["metadata"]["name"]: s for s in chart.by_kind(objects, "Service")}
        self.pods = {}
        self.workloads = {}
        for obj in objects:
            if obj["kind"] in ("Deployment", "StatefulSet"):
                self.pods[obj["metadata"]["labels"]["app.kubernetes.io/component"]] = obj["spec"]["template"]
                self.workloads[obj["metadata"]["labels"]["app.kubernetes.io/component"]] = obj

    def port(self, component, container_port):
        return self.ports.setdefault((component, int(container_port)), free_port())

    def resolve(self, host, port):
        """Cluster DNS and kube-proxy: <service>.<namespace>.svc[.<cluster domain>.]:<port> -> a
        pod's loopback port."""
        name, namespace, rest = host.split(".", 2)
        assert namespace == chart.NAMESPACE and rest in ("svc", f"svc.{self.cluster_domain}."), host
        service = self.services[name]
        [svc_port] = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
        [component] = [c for c, t in self.pods.items() if chart.selects({"matchLabels": service["spec"]["selector"]}, t["metadata"]["labels"])]
        target = svc_port["targetPort"]
        if isinstance(target, str):
            spec = self.pods[component]["spec"]
            [target] = [p["containerPort"] for c in chart.all_containers(spec) for p in c.get("ports", []) if p["name"] == target]
        return self.port(component, target)

    def lay_out_volumes(self, component, spec, root):
        files = {}
        for volume in spec.get("volumes", []):
            contents = {}
            if "configMap" in volume:
                data = self.configmaps[volume["configMap"]["name"]]
                contents = {i["path"]: data[i["key"]] for i in volume["configMap"].get("items", [])} or dict(data)
            elif "secret" in volume:
                data = self.secrets[volume["secret"]["secretName"]]
                contents = {i["path"]: data[i["key"]] for i in volume["secret"].get("items", [])} or dict(data)
            elif "projected" in volume:
                for source in volume["projected"]["sources"]:
                    if "configMap" in source:
                        data = self.configmaps[source["configMap"]["name"]]
                        contents.update({i["path"]: data[i["key"]] for i in source["configMap"]["items"]})
                    elif "secret" in source:
                        data = self.secrets[source["secret"]["name"]]
                        contents.update({i["path"]: data[i["key"]] for i in source["secret"]["items"]})
                    elif "serviceAccountToken" in source:
                        t = source["serviceAccountToken"]
                        contents[t["path"]] = f"token:{chart.NAMESPACE}:{spec['serviceAccountName']}:{t['audience']}"
            elif "emptyDir" in volume:
                pass
            files[volume["name"]] = contents
        for container in chart.all_containers(spec):
            for mount in container.get("volumeMounts", []):
                base = root / mount["mountPath"].lstrip("/")
                base.mkdir(parents=True, exist_ok=True)
                for path, text in files.get(mount["name"], {}).items():
                    (base / path).write_text(text)

    def environment(self, component, container, root):
        env = {"PATH": os.environ.get("PATH", ""), "MINIMESH_LOG_FORMAT": "json"}
        resolved = chart.pod_env(self.workloads[component], container)
        for item in container.get("env", []):
            assert item["name"] in resolved, f"{component}/{container['name']}: {item} (no Secrets here)"
            value = resolved[item["name"]]
            listen = re.fullmatch(r"(0\.0\.0\.0|127\.0\.0\.1):(\d+)", value)
            url = re.fullmatch(r"https://([a-z0-9.-]+\.svc(?:\.[a-z0-9.-]+\.)?):(\d+)", value)
            if listen:
                value = f"127.0.0.1:{self.port(component, listen.group(2))}"
            elif url:
                value = f"https://127.0.0.1:{self.resolve(url.group(1), url.group(2))}"
            elif value.startswith("/") and not value.startswith("/data/"):
                value = str(root / value.lstrip("/"))
            elif value.startswith("/data/"):
                value = str(root / value.lstrip("/"))
                pathlib.Path(value).parent.mkdir(parents=True, exist_ok=True)
            env[item["name"]] = value
        return env

    def start(self, component, only=None, extra_env=None):
        template = self.pods[component]
        spec = template["spec"]
        root = self.dir / component
        root.mkdir()
        self.lay_out_volumes(component, spec, root)
        started = {}
        for container in chart.all_containers(spec):
            if only and container["name"] not in only:
                continue
            env = self.environment(component, container, root) | (extra_env or {})
            log = open(self.dir / f"{component}-{container['name']}.log", "w")
            # The binary the container's command names (the proxies: minimesh-proxy), built locally.
            process = subprocess.Popen(chart.local_argv(container), env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            self.processes.append((process, log))
            started[container["name"]] = env
        return started

    def log(self, component, container):
        return (self.dir / f"{component}-{container}.log").read_text()[-3000:]

    def stop(self):
        for process, log in self.processes:
            if process.poll() is None:
                process.terminate()
        for process, log in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def metric(admin, name):
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=2).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def peer_certificate(port, ca_pem):
    """The certificate a proxy's mTLS listener presents, verified against the trust anchor."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=ca_pem)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.getpeercert()


def uri_sans(cert):
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]


def grpc_status(addr, path):
    """The grpc-status of a gRPC call, over h2c (curl speaks HTTP/2). No request body: the answer
    at the edge depends on the path alone, and curl 7.88 fails a stream whose response ends
    before its request body is sent (the server's RST_STREAM NO_ERROR)."""
    result = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-D", "-", "--http2-prior-knowledge", "--max-time", "20",
         "-X", "POST", "-H", "content-type: application/grpc", "-H", "te: trailers", "-H", "grpc-timeout: 3S",
         f"http://{addr}{path}"],
        capture_output=True, timeout=30,
    )
    found = re.findall(r"^grpc-status: *(\d+)", result.stdout.decode(), re.M | re.I)
    assert found, f"no grpc-status from {path} (curl exit {result.returncode}): {result.stdout!r} {result.stderr!r}"
    return int(found[-1])


METHODS = {"user": "/shop.user.v1.UserService/GetUser", "order": "/shop.order.v1.OrderService/GetOrder",
           "payment": "/shop.payment.v1.PaymentService/GetPayment"}
PERMISSION_DENIED = 7


def ttl_seconds(text):
    return int(text[:-1]) * {"s": 1, "m": 60, "h": 3600}[text[-1]]


@pytest.mark.parametrize("name, values", ISSUER_RENDERINGS, ids=[n for n, _ in ISSUER_RENDERINGS])
def test_every_proxy_gets_its_certificate_from_the_issuer_the_chart_deploys(name, values):
    """The rendered issuer starts with the chart's trust anchor; each rendered sidecar and the
    gateway, with nothing but its projected token, gets a certificate for its own identity from
    it (through the issuer's Service, by the TLS name the chart gives), valid identity.certTTL."""
    if not pathlib.Path(BINARY).exists():
        pytest.fail(f"{BINARY} not built; tests/helm/run.sh builds it")
    objects = chart.install(values)
    v = chart.effective(values)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        secrets = {s["metadata"]["name"]: {k: base64.b64decode(d).decode() for k, d in s["data"].items()}
                   for s in chart.by_kind(objects, "Secret")}
        existing = v["identity"]["trustAnchor"]["existingSecret"]
        if existing:
            # The user's Secret: a CA made with `minimesh certs init`, as README suggests.
            subprocess.run([BINARY, "certs", "init", "--out", str(tmp / "user-ca")], check=True, capture_output=True)
            secrets[existing] = {"tls.crt": (tmp / "user-ca" / "ca.pem").read_text(),
                                 "tls.key": (tmp / "user-ca" / "ca.key").read_text()}
        api_dir = tmp / "api"
        api_dir.mkdir()
        api = TokenReviewApi(api_dir)
        (api_dir / "token").write_text(api.own_token)
        kubelet = Kubelet(objects, tmp, secrets, api, cluster_domain=v["clusterDomain"])
        try:
            # What a pod with automountServiceAccountToken gets: the API address, its CA, its token.
            issuer_env = kubelet.start("identity", extra_env={
                "MINIMESH_KUBERNETES_API": api.url,
                "MINIMESH_KUBERNETES_CA": str(api.ca_file),
                "MINIMESH_KUBERNETES_TOKEN_FILE": str(api_dir / "token"),
            })["identity"]
            metrics = issuer_env["MINIMESH_METRICS_LISTEN"]
            wait_for(lambda: f"{name}: the issuer serving /live ({kubelet.log('identity', 'identity')})",
                     lambda: urllib.request.urlopen(f"http://{metrics}/live", timeout=2).status == 200)
            proxies = {c: kubelet.start(c, only={"sidecar"})["sidecar"] for c in chart.SERVICES}
            proxies["gateway"] = kubelet.start("gateway")["gateway"]
            ttl = ttl_seconds(v["identity"]["certTTL"])
            for identity, env in proxies.items():
                container = "gateway" if identity == "gateway" else "sidecar"
                expiry = wait_for(
                    lambda: f"{name}: {identity} holding a certificate ({kubelet.log(identity, container)})",
                    lambda: metric(env["MINIMESH_ADMIN"], "minimesh_identity_certificate_expiry_timestamp_seconds"),
                )
                assert abs(expiry - (time.time() + ttl)) < 120, f"{name}: {identity} certificate lives {expiry - time.time():.0f}s, not {ttl}s"
            ca_pem = (kubelet.dir / "gateway" / "var/run/minimesh/trust/ca.crt").read_text()
            for identity in chart.SERVICES:
                cert = peer_certificate(int(proxies[identity]["MINIMESH_INBOUND"].rsplit(":", 1)[1]), ca_pem)
                assert uri_sans(cert) == [f"spiffe://{v['mesh']['trustDomain']}/ns/{chart.NAMESPACE}/sa/{identity}"], name
            # The edge: services not in gateway.expose are refused by the gateway itself.
            for service, method in METHODS.items():
                status = grpc_status(proxies["gateway"]["MINIMESH_LISTEN"], method)
                exposed = service in v["gateway"]["expose"]
                assert (status == PERMISSION_DENIED) != exposed, f"{name}: {service} through the gateway: status {status}"
            # What a PodMonitor scrapes answers: /metrics on each port it names, on every pod.
            for monitor in chart.by_kind(objects, "PodMonitor"):
                scraped = set()
                for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                    for component, template in kubelet.pods.items():
                        for container in chart.all_containers(template["spec"]):
                            for port in container.get("ports", []):
                                if port.get("name") == endpoint["port"] and (component, port["containerPort"]) in kubelet.ports:
                                    url = f"http://127.0.0.1:{kubelet.ports[(component, port['containerPort'])]}{endpoint['path']}"
                                    text = urllib.request.urlopen(url, timeout=5).read().decode()
                                    assert "# TYPE " in text, f"{name}: {component}/{container['name']} {url}"
                                    scraped.add(component)
                assert scraped == set(chart.SERVICES + ["gateway", "identity"]), f"{name}: PodMonitor scraped {scraped}"
            reviewed = {r["spec"]["token"].split(":")[2] for r in api.reviews}
            prefix = f"{chart.fullname(values)}-"
            assert reviewed == {prefix + i for i in chart.SERVICES + ["gateway"]}, f"{name}: TokenReviews for {reviewed}"
            assert all(r["path_ok"] and r["authorised"] for r in api.reviews), "the issuer calls TokenReview with its own token"
            assert all(r["spec"]["audiences"] == ["minimesh-identity"] for r in api.reviews)
        finally:
            kubelet.stop()
            api.close()


class FakeApiServer:
    """Just enough of the Kubernetes API for `helm install --dry-run=server`: discovery, an empty
    OpenAPI document (so nothing is validated twice), and GET of Secrets it holds."""

    GROUPS = {"apps": ("v1", ["deployments", "statefulsets"]), "policy": ("v1", ["poddisruptionbudgets"]),
              "rbac.authorization.k8s.io": ("v1", ["clusterroles", "clusterrolebindings"]),
              "networking.k8s.io": ("v1", ["networkpolicies"]), "autoscaling": ("v2", ["horizontalpodautoscalers"])}
    KINDS = {"deployments": "Deployment", "statefulsets": "StatefulSet", "poddisruptionbudgets": "PodDisruptionBudget",
             "clusterroles": "ClusterRole", "clusterrolebindings": "ClusterRoleBinding", "networkpolicies": "NetworkPolicy",
             "horizontalpodautoscalers": "HorizontalPodAutoscaler", "secrets": "Secret", "configmaps": "ConfigMap",
             "services": "Service", "serviceaccounts": "ServiceAccount", "pods": "Pod"}

    def __init__(self, kube_version="1.30.0"):
        self.objects = {}
        self.writes = []
        major, minor, _ = kube_version.split(".")
        fake = self

        def resources(group_version, names):
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": [
                {"name": n, "singularName": "", "namespaced": not n.startswith("cluster"), "kind": fake.KINDS[n],
                 "verbs": ["get", "list", "create", "patch", "delete"]} for n in names]}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/version":
                    return self.answer(200, {"major": major, "minor": minor, "gitVersion": f"v{kube_version}"})
                if path == "/api":
                    return self.answer(200, {"kind": "APIVersions", "versions": ["v1"]})
                if path == "/apis":
                    return self.answer(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                        {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                         "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}}
                        for g, (v, _) in fake.GROUPS.items()]})
                if path == "/api/v1":
                    return self.answer(200, resources("v1", ["secrets", "configmaps", "services", "serviceaccounts", "pods"]))
                for group, (version, names) in fake.GROUPS.items():
                    if path == f"/apis/{group}/{version}":
                        return self.answer(200, resources(f"{group}/{version}", names))
                if path == "/openapi/v2":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/com.github.proto-openapi.spec.v2.v1.0+protobuf")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path == "/openapi/v3":
                    return self.answer(200, {"paths": {}})
                if path in fake.objects:
                    return self.answer(200, fake.objects[path])
                self.answer(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})

            def do_POST(self):
                fake.writes.append((self.command, self.path))
                self.answer(405, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 405})

            do_PUT = do_PATCH = do_DELETE = do_POST

            def answer(self, code, doc):
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def render(self, values):
        config = helm_python.Config(storage_driver="memory", namespace=chart.NAMESPACE, kube_apiserver=self.url)
        manifest = config.install(str(chart.CHART), chart.RELEASE, values, dry_run="server")["manifest"]
        return [d for d in yaml.safe_load_all(manifest) if d]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def anchor_of(objects):
    [secret] = chart.by_kind(objects, "Secret")
    [configmap] = [c for c in chart.by_kind(objects, "ConfigMap") if c["metadata"]["name"] == secret["metadata"]["name"]]
    return secret, configmap["data"]["ca.crt"]


def test_the_generated_trust_anchor_is_kept_across_upgrades():
    """Rendered against an API server (Helm's `lookup` sees the cluster): a fresh install
    generates a new trust anchor; once its Secret exists, every later render reuses it, key
    included, so an upgrade never replaces the mesh's CA."""
    api = FakeApiServer()
    try:
        first, first_ca = anchor_of(api.render({}))
        second, _ = anchor_of(api.render({}))
        assert first["data"]["tls.key"] != second["data"]["tls.key"], "no Secret yet: a new trust anchor each time"
        path = f"/api/v1/namespaces/{chart.NAMESPACE}/secrets/{first['metadata']['name']}"
        # As the install left it: Helm marks what it applies as the release's.
        ownership = {"meta.helm.sh/release-name": chart.RELEASE, "meta.helm.sh/release-namespace": chart.NAMESPACE}
        api.objects[path] = first | {"metadata": first["metadata"] | {"namespace": chart.NAMESPACE, "annotations": ownership}}
        for values in ({}, {"identity": {"certTTL": "12h"}, "gateway": {"expose": ["order"]}}):
            objects = api.render(values)
            again, again_ca = anchor_of(objects)
            assert again["data"] == first["data"], "the existing trust anchor is kept"
            assert again_ca == first_ca
            checksums = {o["spec"]["template"]["metadata"]["annotations"]["checksum/trust-anchor"]
                         for o in objects if o["kind"] in ("Deployment", "StatefulSet")}
            assert len(checksums) == 1
        assert not api.writes, f"a dry run wrote to the API: {api.writes}"
    finally:
        api.close()
