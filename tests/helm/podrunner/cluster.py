"""Runs what Helm renders as pods would run, without a cluster.

Every pod of every Deployment and StatefulSet (respecting replicas) gets a network namespace with
its own address on a bridge; each container runs in a private mount namespace where the pod's
volumes (ConfigMaps, Secrets, projected tokens, emptyDirs, claims) are bind-mounted at the paths
the spec gives, with the rendered env (valueFrom resolved), command and args, as the spec's user:
the minimesh image's binaries (/usr/local/bin/minimesh, its entrypoint, and minimesh-proxy) are the
local builds (the `binary` given and minimesh-proxy beside it). Native
sidecars start first and gate the rest on their startupProbe; plain init containers run to
completion. Probes run as kubelet runs them, from the node (the root namespace), with periods
scaled by `period_scale`. Services: names resolve through a hosts file bind-mounted as each pod's
/etc/hosts (headless Services to every ready pod, ClusterIP Services to a virtual address that
an nftables kube-proxy in each pod's namespace translates to a ready pod). Stand-ins only where
the real thing cannot run: PostgreSQL from Debian's packages for the postgres image, an HTTPS
TokenReview endpoint for the API server.
"""

import atexit
import base64
import hashlib
import json
import os
import pathlib
import pwd
import random
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import http.client
import math

from . import net
from .kubeapi import TokenReviewApi, parse_token, token
from .netpol import Peer, admits, selects

HERE = pathlib.Path(__file__).resolve().parent
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PG_BIN = pathlib.Path("/usr/lib/postgresql/15/bin")
# The minimesh image's USER (Dockerfile: USER 65532:65532).
MINIMESH_IMAGE_USER = (65532, 65532)
# The images' STOPSIGNAL, which the container runtime sends to a container's first process
# (the postgres image's: SIGINT, PostgreSQL's fast shutdown). The minimesh image sets none: SIGTERM,
# whichever of its binaries (minimesh, minimesh-proxy) the container runs.
STOP_SIGNALS = {"minimesh": signal.SIGTERM, "postgres": signal.SIGINT}
# The minimesh image's binaries (Dockerfile: COPY to /usr/local/bin), each a file of the local build's
# target directory (the proxy is the minimesh binary's sibling). Its ENTRYPOINT is the first.
IMAGE_BINARIES = ("minimesh", "minimesh-proxy")
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
KUBE_API_ACCESS = "/var/run/secrets/kubernetes.io/serviceaccount"
NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"
TOOLS = {t: shutil.which(t) for t in ("nsenter", "unshare", "mount", "setpriv", "nft", "ip", "curl")}


class PodFailure(AssertionError):
    """A pod did what a cluster would report: a probe failing, a container exiting, a config error."""


def _tail(path, lines=25):
    try:
        return "\n".join(pathlib.Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Probe:
    """One probe of one container, run from the node as kubelet runs it."""

    def __init__(self, container, kind, spec, scale):
        self.container, self.kind, self.spec = container, kind, spec
        self.rendered_period = spec.get("periodSeconds", 10)
        # Probed `scale` times as often as rendered, so that success shows sooner; a failure
        # counts only once it lasted as long as kubelet's window (failureThreshold periods).
        self.period = max(0.1, self.rendered_period * scale)
        self.delay = spec.get("initialDelaySeconds", 0) * scale
        self.timeout = spec.get("timeoutSeconds", 1)
        self.success_threshold = spec.get("successThreshold", 1)
        self.failure_threshold = spec.get("failureThreshold", 3)
        self.failures_needed = math.ceil(self.failure_threshold * self.rendered_period / self.period)
        self.passing = False
        self.consecutive_ok = 0
        self.consecutive_failed = 0
        self.total_ok = 0
        self.last_error = "not run yet"

    def port(self, action):
        port = action["port"]
        if isinstance(port, str):
            ports = {p["name"]: p["containerPort"] for p in self.container.spec.get("ports", []) if "name" in p}
            if port not in ports:
                raise PodFailure(f"{self.where()}: {self.kind} names port {port!r}, which the container does not declare")
            return ports[port]
        return int(port)

    def where(self):
        return f"pod {self.container.pod.name} container {self.container.name}"

    def describe(self):
        spec, pod = self.spec, self.container.pod
        try:
            if "httpGet" in spec:
                a = spec["httpGet"]
                return f"httpGet {a.get('scheme', 'HTTP').lower()}://{a.get('host', pod.ip)}:{self.port(a)}{a.get('path', '/')}"
            if "grpc" in spec:
                return f"grpc {pod.ip}:{self.port(spec['grpc'])} service={spec['grpc'].get('service', '')!r}"
            if "tcpSocket" in spec:
                return f"tcpSocket {spec['tcpSocket'].get('host', pod.ip)}:{self.port(spec['tcpSocket'])}"
            if "exec" in spec:
                return f"exec {spec['exec']['command']}"
        except PodFailure as e:
            return str(e)
        return f"unsupported probe {sorted(spec)}"

    def check(self):
        """(ok, detail) of one attempt."""
        spec, pod = self.spec, self.container.pod
        try:
            if "httpGet" in spec:
                a = spec["httpGet"]
                host, port = a.get("host", pod.ip), self.port(a)
                if a.get("scheme", "HTTP").upper() == "HTTPS":
                    conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=ssl._create_unverified_context())
                else:
                    conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
                try:
                    headers = {"User-Agent": "kube-probe/1.30", "Accept": "*/*"}
                    headers.update({h["name"]: h["value"] for h in a.get("httpHeaders", [])})
                    conn.request("GET", a.get("path", "/"), headers=headers)
                    status = conn.getresponse().status
                finally:
                    conn.close()
                return 200 <= status < 400, f"HTTP {status}"
            if "tcpSocket" in spec:
                import socket
                a = spec["tcpSocket"]
                with socket.create_connection((a.get("host", pod.ip), self.port(a)), timeout=self.timeout):
                    return True, "connected"
            if "grpc" in spec:
                return self._grpc(pod.ip, self.port(spec["grpc"]), spec["grpc"].get("service", ""))
            if "exec" in spec:
                result = self.container.exec(spec["exec"]["command"], timeout=self.timeout)
                output = (result.stdout + result.stderr).strip()[-300:]
                return result.returncode == 0, f"exit {result.returncode}: {output}"
        except subprocess.TimeoutExpired:
            return False, f"timed out after {self.timeout}s"
        except PodFailure:
            raise
        except Exception as e:  # refused, reset, timeout: a failed attempt
            return False, f"{type(e).__name__}: {e}"
        raise PodFailure(f"{self.where()}: {self.kind} has no supported action: {sorted(spec)}")

    def _grpc(self, ip, port, service):
        """grpc.health.v1.Health/Check over h2c, as kubelet's gRPC probe (plaintext, no client cert)."""
        body = service.encode()
        message = (b"\x0a" + bytes([len(body)]) + body) if body else b""
        frame = b"\x00" + len(message).to_bytes(4, "big") + message
        result = subprocess.run(
            [TOOLS["curl"], "-sS", "--http2-prior-knowledge", "--max-time", str(self.timeout), "-D", "-", "-o", "-",
             "-X", "POST", "-H", "content-type: application/grpc", "-H", "te: trailers", "--data-binary", "@-",
             f"http://{ip}:{port}/grpc.health.v1.Health/Check"],
            input=frame, capture_output=True, timeout=self.timeout + 2)
        status = re.findall(rb"grpc-status: *(\d+)", result.stdout, re.I)
        if result.returncode != 0 or not status:
            return False, f"curl exit {result.returncode}: {result.stderr.decode(errors='replace').strip()}"
        serving = b"\x08\x01" in result.stdout.split(b"\r\n\r\n", 1)[-1]
        return status[-1] == b"0" and serving, f"grpc-status {status[-1].decode()}, serving={serving}"

    def run(self, stop):
        cluster = self.container.pod.cluster
        if stop.wait(self.delay):
            return
        while not stop.is_set():
            try:
                ok, detail = self.check()
            except PodFailure as e:
                cluster.fail(str(e))
                return
            if stop.is_set():
                return
            if ok:
                self.consecutive_ok += 1
                self.consecutive_failed = 0
                self.total_ok += 1
                self.last_error = None
                if self.consecutive_ok >= self.success_threshold and not self.passing:
                    self.passing = True
                    self.container.probe_changed(self)
            else:
                self.consecutive_failed += 1
                self.consecutive_ok = 0
                self.last_error = detail
                if self.consecutive_failed >= self.failures_needed:
                    was = self.passing
                    self.passing = False
                    self.container.probe_failed(self, detail, was)
                    if self.kind != "readinessProbe":
                        return
            if self.kind == "startupProbe" and self.passing:
                return
            stop.wait(self.period)

    def failure_message(self, detail):
        window = self.failure_threshold * self.rendered_period
        return (f"pod {self.container.pod.name} container {self.container.name}: {self.kind} {self.describe()} "
                f"failed for {window}s (failureThreshold {self.failure_threshold} x periodSeconds {self.rendered_period}): {detail}")


class Container:
    def __init__(self, pod, spec, role):
        self.pod, self.spec, self.role = pod, spec, role  # role: init, sidecar or main
        self.name = spec["name"]
        self.process = None
        self.stopping = False
        self.exit_code = None
        self.log_path = pod.dir / "logs" / f"{self.name}.log"
        self.user = (0, 0, [])
        self.env = {}
        self.stop_signal = signal.SIGTERM
        self.probes = {k: Probe(self, k, spec[k], pod.cluster.period_scale)
                       for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in spec}
        self.startup_done = threading.Event()

    def where(self):
        return f"pod {self.pod.name} container {self.name}"

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    @property
    def ready(self):
        if not self.running or not self.startup_done.is_set():
            return False
        readiness = self.probes.get("readinessProbe")
        return readiness.passing if readiness else True

    def probe_changed(self, probe):
        if probe.kind == "startupProbe":
            self.startup_done.set()
            self._start_probes(("livenessProbe", "readinessProbe"))
        self.pod.cluster.readiness_changed(self.pod)

    def probe_failed(self, probe, detail, was_passing):
        cluster = self.pod.cluster
        if probe.kind in ("startupProbe", "livenessProbe"):
            # Kubelet would kill and restart the container: here that fails the scenario.
            cluster.fail(probe.failure_message(detail))
        elif was_passing:
            cluster.readiness_changed(self.pod)
            if self.pod.was_ready and not cluster.disrupting:
                cluster.fail(probe.failure_message(detail) + " (the pod was ready and became unready)")

    def _start_probes(self, kinds):
        for kind in kinds:
            if kind in self.probes:
                threading.Thread(target=self.probes[kind].run, args=(self.pod.stop,), daemon=True,
                                 name=f"{self.pod.name}/{self.name}/{kind}").start()

    def start_probes(self):
        if "startupProbe" in self.probes:
            self._start_probes(("startupProbe",))
        else:
            self.startup_done.set()
            self._start_probes(("livenessProbe", "readinessProbe"))
            self.pod.cluster.readiness_changed(self.pod)

    def exec(self, command, timeout=10, user=None):
        """Runs a command in the container's namespaces as its user (kubectl exec)."""
        uid, gid, groups = user or self.user
        argv = [TOOLS["nsenter"], f"--target={self.process.pid}", "--net", "--mount", "--uts", "--",
                *setpriv(uid, gid, groups, self.spec), "--", *command]
        return subprocess.run(argv, env=self.env | {"PATH": self.env.get("PATH", IMAGE_PATH)},
                              capture_output=True, text=True, timeout=timeout)

    def log(self, lines=25):
        return _tail(self.log_path, lines)


def setpriv(uid, gid, groups, spec):
    ctx = spec.get("securityContext") or {}
    argv = [TOOLS["setpriv"], f"--reuid={uid}", f"--regid={gid}"]
    argv += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    if ctx.get("allowPrivilegeEscalation") is False:
        argv.append("--no-new-privs")
    if "ALL" in (ctx.get("capabilities") or {}).get("drop", []):
        argv += ["--inh-caps=-all", "--bounding-set=-all"]
    return argv


class Pod:
    def __init__(self, cluster, workload, name, ordinal=None):
        self.cluster, self.workload, self.name, self.ordinal = cluster, workload, name, ordinal
        template = workload["spec"]["template"] if workload["kind"] != "Pod" else workload
        self.spec = json.loads(json.dumps(template["spec"]))
        self.namespace = cluster.namespace
        self.labels = dict(template["metadata"].get("labels", {}))
        self.annotations = dict(template["metadata"].get("annotations", {}))
        self.component = self.labels.get("app.kubernetes.io/component", workload["metadata"]["name"])
        if workload["kind"] == "StatefulSet":
            self.labels["statefulset.kubernetes.io/pod-name"] = name
            self.labels["apps.kubernetes.io/pod-index"] = str(ordinal)  # Kubernetes 1.28+
            self.spec.setdefault("hostname", name)
            self.spec.setdefault("subdomain", workload["spec"].get("serviceName"))
        elif workload["kind"] == "Deployment":
            self.labels["pod-template-hash"] = cluster.template_hash(workload)
        self.uid = "%032x" % random.getrandbits(128)
        self.dir = cluster.workdir / "pods" / name
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.phase = "Pending"
        self.was_ready = False
        # Readiness as the Services last published it (names and rules follow it).
        self.published_ready = False
        self.stop = threading.Event()
        self.ip = self.netns = self.host_end = None
        init = [Container(self, c, "sidecar" if c.get("restartPolicy") == "Always" else "init")
                for c in self.spec.get("initContainers", [])]
        self.containers = init + [Container(self, c, "main") for c in self.spec["containers"]]
        self.flows = None

    def container(self, name):
        [found] = [c for c in self.containers if c.name == name]
        return found

    @property
    def ready(self):
        return self.phase == "Running" and all(c.ready for c in self.containers if c.role != "init")

    def peer(self):
        ports = {p["name"]: p["containerPort"] for c in self.containers for p in c.spec.get("ports", []) if "name" in p}
        return Peer(self.ip, self.namespace, self.labels, ports, name=f"pod {self.name}")

    def probe_ports(self):
        out = set()
        for c in self.containers:
            for probe in c.probes.values():
                action = probe.spec.get("httpGet") or probe.spec.get("tcpSocket") or probe.spec.get("grpc")
                if action:
                    out.add(probe.port(action))
        return out

    def why_not_ready(self):
        """One line per container holding the pod back: the probe failing and its last error."""
        out = []
        for c in self.containers:
            if c.role == "init" or c.ready:
                continue
            if not c.running:
                state = "not started" if c.process is None else f"exited with code {c.exit_code}"
                out.append(f"pod {self.name} container {c.name}: {state}")
                continue
            for probe in c.probes.values():
                if not probe.passing and probe.kind != "livenessProbe":
                    out.append(f"pod {self.name} container {c.name}: {probe.kind} {probe.describe()} "
                               f"{'never passed' if probe.total_ok == 0 else 'failing'}: {probe.last_error}")
        return out

    def status(self):
        """What `kubectl describe` would say about why this pod is not ready."""
        lines = [f"pod {self.name} ({self.phase}, ip {self.ip}):"]
        for c in self.containers:
            state = "running" if c.running else (f"exited {c.exit_code}" if c.exit_code is not None else "not started")
            lines.append(f"  container {c.name} ({c.role}): {state}, ready={c.ready}")
            for probe in c.probes.values():
                lines.append(f"    {probe.kind} {probe.describe()}: passing={probe.passing}, "
                             f"successes={probe.total_ok}, failing in a row={probe.consecutive_failed}, last error: {probe.last_error}")
            if not c.ready and c.process is not None:
                lines.append("    last log lines:\n      " + c.log(6).replace("\n", "\n      "))
        return "\n".join(lines)


class Client:
    """A network namespace that is no workload's pod: a caller from another namespace (an
    ingress controller, Prometheus) or an intruder. It resolves names as the pods do."""

    def __init__(self, cluster, name, namespace, labels):
        self.cluster, self.name, self.namespace, self.labels = cluster, name, namespace, labels
        self.dir = cluster.workdir / "clients" / name
        self.dir.mkdir(parents=True)
        self.netns, self.ip, self.host_end = cluster.network.add_namespace()

    def peer(self):
        return Peer(self.ip, self.namespace, self.labels, name=f"client {self.name} (namespace {self.namespace})")

    def run(self, argv, timeout=30, input=None, check=False):
        """Runs a command in this namespace with the cluster's hosts file as /etc/hosts."""
        script = (f"{TOOLS['mount']} --bind {shlex.quote(str(self.dir / 'hosts'))} /etc/hosts && "
                  f"{TOOLS['mount']} --bind {shlex.quote(str(self.dir / 'resolv.conf'))} /etc/resolv.conf && exec \"$@\"")
        cmd = [TOOLS["nsenter"], f"--net=/run/netns/{self.netns}", "--", TOOLS["unshare"], "--mount",
               "--propagation", "private", "--", "/bin/sh", "-c", script, "client", *map(str, argv)]
        result = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input,
                                text=not isinstance(input, bytes))
        if check and result.returncode != 0:
            raise AssertionError(f"{argv[0]} in client {self.name}: exit {result.returncode}: {result.stderr}")
        return result

    def http_get(self, url, timeout=5):
        """(status, body) of a GET from this namespace (addresses, not names)."""
        import urllib.request

        def get():
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read().decode()
        return net.in_netns(self.netns, get, timeout=timeout + 5)


class Cluster:
    def __init__(self, objects, *, binary, image_repository, namespace, period_scale=0.25,
                 cluster_domain="cluster.local", secrets=None, skip_components=("jaeger",)):
        for tool, path in TOOLS.items():
            if not path:
                raise RuntimeError(f"the pod runner needs {tool}")
        if not (PG_BIN / "postgres").exists() and any(
                c["image"].split("@")[0].rsplit(":", 1)[0].endswith("/postgres") or c["image"].startswith("postgres:")
                for o in objects if o["kind"] in ("Deployment", "StatefulSet")
                for c in o["spec"]["template"]["spec"]["containers"]):
            raise RuntimeError(f"the PostgreSQL stand-in needs {PG_BIN} (Debian's postgresql-15)")
        self.objects = objects
        self.binary_source = pathlib.Path(binary)
        self.namespace = namespace
        self.period_scale = period_scale
        self.cluster_domain = cluster_domain
        self.image_repository = image_repository
        self.skip_components = set(skip_components)
        self.lock = threading.RLock()
        self.failures = []
        self.events = []  # readiness changes and disruptions, timestamped, for diagnosis
        self.started = time.monotonic()
        self.disrupting = 0
        self.closed = False
        self.pods = []  # every pod ever created, deleted ones included
        self.clients = []
        self._synced = {}
        self._rules_text = None
        self._old_signals = {}
        self.configmaps = {c["metadata"]["name"]: dict(c.get("data") or {}) for c in self._kind("ConfigMap")}
        self.secrets = {}
        for s in self._kind("Secret"):
            data = {k: base64.b64decode(v) for k, v in (s.get("data") or {}).items()}
            data.update({k: v.encode() for k, v in (s.get("stringData") or {}).items()})
            self.secrets[s["metadata"]["name"]] = data
        for name, data in (secrets or {}).items():
            self.secrets[name] = {k: v if isinstance(v, bytes) else v.encode() for k, v in data.items()}
        self.services = self._kind("Service")
        self.service_accounts = {s["metadata"]["name"]: s for s in self._kind("ServiceAccount")}
        self.policies = self._kind("NetworkPolicy")
        self.workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Pod")
                          and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") not in self.skip_components]
        unsupported = [o["kind"] for o in objects if o["kind"] in ("DaemonSet", "Job", "CronJob", "ReplicaSet")]
        if unsupported:
            raise RuntimeError(f"the pod runner does not run {sorted(set(unsupported))}")

    # -- setup and teardown --------------------------------------------------------------------

    def start(self):
        atexit.register(self.close)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_signals[sig] = signal.signal(sig, self._on_signal)
        self.network = net.Network()
        self.workdir = self.network.workdir
        bin_dir = self.workdir / "bin"
        bin_dir.mkdir()
        # {image binary: its copy here}; one that was not built is missing, and a container that runs
        # it fails naming itself (_argv).
        self.binaries = {}
        for name in IMAGE_BINARIES:
            source = self.binary_source.with_name(name) if name != "minimesh" else self.binary_source
            if name != "minimesh" and not source.is_file():
                continue
            self.binaries[name] = bin_dir / name
            try:
                os.link(source, self.binaries[name])
            except OSError:
                shutil.copy(source, self.binaries[name])
            os.chmod(self.binaries[name], 0o755)
        self.binary = self.binaries["minimesh"]
        self.pg_entrypoint = bin_dir / "postgres-entrypoint.sh"
        shutil.copy(HERE / "postgres-entrypoint.sh", self.pg_entrypoint)
        os.chmod(self.pg_entrypoint, 0o755)
        self.vips = {}
        for svc in self.services:
            if svc["spec"].get("clusterIP") != "None" and svc["spec"].get("type") != "ExternalName":
                self.vips[svc["metadata"]["name"]] = self.network.service_ip()
        api_dir = self.workdir / "kube-apiserver"
        api_dir.mkdir()
        self.api = None
        for port in (443, 6443, 0):
            try:
                self.api = TokenReviewApi(api_dir, host=self.network.node_ip, port=port, authorised=self._may_review)
                break
            except OSError:
                continue
        with self.lock:
            self._sync()
        for workload in self.workloads:
            threading.Thread(target=self._controller, args=(workload,), daemon=True,
                             name=f"controller {workload['metadata']['name']}").start()
        return self

    def _on_signal(self, signum, frame):
        self.close()
        previous = self._old_signals.get(signum)
        if callable(previous):
            previous(signum, frame)
        raise SystemExit(128 + signum)

    def close(self):
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for pod in self.pods:
            pod.stop.set()
        running = [c for p in self.pods for c in p.containers if c.running]
        for c in running:
            c.stopping = True
            try:
                os.kill(c.process.pid, c.stop_signal)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 3
        for c in running:
            try:
                c.process.wait(max(0.05, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(c.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            c.process.wait()
        if getattr(self, "api", None):
            self.api.close()
        if hasattr(self, "network"):
            # MMPR_KEEP_WORKDIR=1 keeps logs and volumes for a look after a failure.
            if os.environ.get("MMPR_KEEP_WORKDIR") == "1":
                self.network.state["workdir"] = None
            self.network.close()
        for sig, previous in self._old_signals.items():
            try:
                signal.signal(sig, previous)
            except (TypeError, ValueError):
                pass
        atexit.unregister(self.close)

    def _kind(self, kind):
        return [o for o in self.objects if o["kind"] == kind]

    def elapsed(self):
        return f"+{time.monotonic() - self.started:.1f}s"

    def event(self, message):
        self.events.append(f"{self.elapsed()} {message}")

    def fail(self, message):
        with self.lock:
            if self.closed:
                return
            self.failures.append(f"[{self.elapsed()}] {message}")

    def check(self):
        """Raises the first failure any pod reported (a probe beyond its threshold, an exit)."""
        if self.failures:
            raise PodFailure("\n".join(self.failures[:5]) + "\nrecent events:\n  " + "\n  ".join(self.events[-12:]))

    # -- controllers -----------------------------------------------------------------------------

    def template_hash(self, workload):
        digest = hashlib.sha256(json.dumps(workload["spec"]["template"], sort_keys=True).encode()).digest()
        return "".join(NAME_CHARS[b % len(NAME_CHARS)] for b in digest[:10])

    def replicas(self, workload):
        if workload["kind"] == "Pod":
            return 1
        if "replicas" in workload["spec"]:
            return workload["spec"]["replicas"]
        for hpa in self._kind("HorizontalPodAutoscaler"):
            if hpa["spec"]["scaleTargetRef"]["name"] == workload["metadata"]["name"]:
                return hpa["spec"].get("minReplicas", 1)
        return 1

    def _new_pod(self, workload, ordinal=None):
        name = workload["metadata"]["name"]
        if workload["kind"] == "StatefulSet":
            pod_name = f"{name}-{ordinal}"
        elif workload["kind"] == "Deployment":
            suffix = "".join(random.choice(NAME_CHARS) for _ in range(5))
            pod_name = f"{name}-{self.template_hash(workload)}-{suffix}"
        else:
            pod_name = name
        pod = Pod(self, workload, pod_name, ordinal)
        with self.lock:
            self.pods.append(pod)
        return pod

    def _controller(self, workload):
        """The Deployment or StatefulSet controller: creates the pods; a StatefulSet with the
        default OrderedReady policy waits for each pod to be ready before the next."""
        ordered = workload["kind"] == "StatefulSet" and workload["spec"].get("podManagementPolicy", "OrderedReady") == "OrderedReady"
        for i in range(self.replicas(workload)):
            pod = self._new_pod(workload, i if workload["kind"] == "StatefulSet" else None)
            if ordered:
                self._boot(pod)
                while not pod.published_ready and not self.closed and not self.failures:
                    time.sleep(0.05)
            else:
                threading.Thread(target=self._boot, args=(pod,), daemon=True, name=f"boot {pod.name}").start()

    def _boot(self, pod):
        try:
            self._boot_steps(pod)
        except PodFailure as e:
            self.fail(str(e))
        except Exception as e:
            if not self.closed:
                self.fail(f"pod {pod.name}: could not be started: {type(e).__name__}: {e}")

    def _boot_steps(self, pod):
        if self.closed:
            return
        pod.netns, pod.ip, pod.host_end = self.network.add_namespace()
        pod.phase = "Running"  # has its address: it takes part in names and rules from now
        volumes = self._volumes(pod)
        with self.lock:
            self._sync()
        for container in pod.containers:
            if pod.stop.is_set():
                return
            self._spawn(pod, container, volumes)
            if container.role == "init":
                code = container.process.wait()
                if code != 0:
                    raise PodFailure(f"{container.where()}: init container exited with code {code}; "
                                     f"last log lines:\n{container.log()}")
                continue
            container.start_probes()
            if container.role == "sidecar":
                # The next container starts once this sidecar's startupProbe passed (or it runs).
                while not container.startup_done.wait(0.05):
                    if pod.stop.is_set() or self.closed or not container.running:
                        return

    # -- containers ------------------------------------------------------------------------------

    def runtime(self, container):
        image = container.spec["image"]
        repository = image.split("@")[0]
        repository = repository.rsplit(":", 1)[0] if ":" in repository.rsplit("/", 1)[-1] else repository
        if repository == self.image_repository or repository.endswith("/" + self.image_repository):
            return "minimesh"
        if repository == "postgres" or repository.endswith("/postgres"):
            return "postgres"
        raise PodFailure(f"{container.where()}: no way to run image {image} here (only {self.image_repository} and postgres)")

    def _user(self, pod, container, runtime):
        pod_ctx = pod.spec.get("securityContext") or {}
        ctx = container.spec.get("securityContext") or {}
        if runtime == "postgres":
            # Debian's postgres user stands for the image's (uid 999): initdb needs a passwd entry.
            pw = pwd.getpwnam("postgres")
            return pw.pw_uid, pw.pw_gid, [pw.pw_gid]
        uid = ctx.get("runAsUser", pod_ctx.get("runAsUser", MINIMESH_IMAGE_USER[0]))
        gid = ctx.get("runAsGroup", pod_ctx.get("runAsGroup", MINIMESH_IMAGE_USER[1]))
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) and uid == 0:
            raise PodFailure(f"{container.where()}: CreateContainerConfigError: runAsNonRoot and the image runs as root")
        groups = [g for g in [pod_ctx.get("fsGroup")] + list(pod_ctx.get("supplementalGroups", [])) if g is not None]
        return uid, gid, groups

    def _fs_group(self, pod):
        if any(self.runtime(c) == "postgres" for c in pod.containers):
            return pwd.getpwnam("postgres").pw_gid
        return (pod.spec.get("securityContext") or {}).get("fsGroup")

    def _value_from(self, pod, container, source, env):
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            kind = "secretKeyRef" if "secretKeyRef" in source else "configMapKeyRef"
            ref = source[kind]
            store = self.secrets if kind == "secretKeyRef" else {k: {kk: vv.encode() for kk, vv in v.items()} for k, v in self.configmaps.items()}
            what = "secret" if kind == "secretKeyRef" else "configmap"
            if ref["name"] not in store:
                if ref.get("optional"):
                    return None
                raise PodFailure(f"{container.where()}: CreateContainerConfigError: {what} {ref['name']!r} not found")
            if ref["key"] not in store[ref["name"]]:
                if ref.get("optional"):
                    return None
                raise PodFailure(f"{container.where()}: CreateContainerConfigError: couldn't find key {ref['key']} in {what} {ref['name']}")
            return store[ref["name"]][ref["key"]].decode()
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            fields = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "metadata.uid": pod.uid,
                      "spec.nodeName": "node", "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
                      "status.podIP": pod.ip, "status.podIPs": pod.ip, "status.hostIP": self.network.node_ip,
                      "status.hostIPs": self.network.node_ip}
            m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
            if m:
                return (pod.labels if m.group(1) == "labels" else pod.annotations).get(m.group(2), "")
            if path not in fields:
                raise PodFailure(f"{container.where()}: unsupported fieldRef {path}")
            return fields[path]
        raise PodFailure(f"{container.where()}: unsupported valueFrom {source}")

    def _env(self, pod, container, runtime):
        env = {"PATH": IMAGE_PATH, "HOSTNAME": pod.name,
               "KUBERNETES_SERVICE_HOST": self.api.host, "KUBERNETES_SERVICE_PORT": str(self.api.port),
               "KUBERNETES_SERVICE_PORT_HTTPS": str(self.api.port)}
        if runtime == "postgres":
            # The image's environment (LANG: a locale every Debian has).
            env.update({"PATH": f"{PG_BIN}:{IMAGE_PATH}", "PGDATA": "/var/lib/postgresql/data", "LANG": "C.UTF-8",
                        "PG_MAJOR": "15", "HOME": "/var/lib/postgresql"})

        def expand(text):
            return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                          lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)

        for source in container.spec.get("envFrom", []):
            prefix = source.get("prefix", "")
            ref = source.get("secretRef") or source.get("configMapRef")
            store = self.secrets if "secretRef" in source else {k: {kk: vv.encode() for kk, vv in v.items()} for k, v in self.configmaps.items()}
            if ref["name"] not in store:
                if ref.get("optional"):
                    continue
                raise PodFailure(f"{container.where()}: CreateContainerConfigError: {ref['name']!r} not found")
            env.update({prefix + k: v.decode() for k, v in store[ref["name"]].items()})
        for item in container.spec.get("env", []):
            if "valueFrom" in item:
                value = self._value_from(pod, container, item["valueFrom"], env)
                if value is None:
                    continue
            else:
                value = expand(str(item.get("value", "")))
            env[item["name"]] = value
        return env, expand

    def _argv(self, container, runtime, expand):
        spec = container.spec
        args = [expand(str(a)) for a in spec.get("args", [])]
        if runtime == "minimesh":
            command = [expand(str(c)) for c in spec.get("command", [])] or ["/usr/local/bin/minimesh"]
            # An absolute path in the image, or a name the image's PATH finds there.
            name = command[0].removeprefix("/usr/local/bin/")
            if name not in IMAGE_BINARIES or command[0] not in (name, f"/usr/local/bin/{name}"):
                raise PodFailure(f"{container.where()}: command {command[0]} is not in the image")
            if name not in self.binaries:
                raise PodFailure(f"{container.where()}: command {command[0]} runs {name}, but "
                                 f"{self.binary_source.with_name(name)} was not built (cargo build --bins)")
            return [str(self.binaries[name]), *command[1:], *args]
        if spec.get("command"):
            raise PodFailure(f"{container.where()}: the postgres stand-in runs the image's entrypoint only")
        return ["/bin/bash", str(self.pg_entrypoint), *args]

    def _spawn(self, pod, container, volumes):
        runtime = self.runtime(container)
        env, expand = self._env(pod, container, runtime)
        argv = self._argv(container, runtime, expand)
        container.user = self._user(pod, container, runtime)
        container.env = env
        container.stop_signal = STOP_SIGNALS[runtime]
        mounts = [(pod.dir / "hosts", "/etc/hosts", False), (pod.dir / "resolv.conf", "/etc/resolv.conf", False)]
        mounted = {m["mountPath"] for m in container.spec.get("volumeMounts", [])}
        for m in container.spec.get("volumeMounts", []):
            if m["name"] not in volumes:
                raise PodFailure(f"{container.where()}: volumeMount {m['name']!r} names no volume of the pod")
            source, read_only = volumes[m["name"]]
            if m.get("subPath"):
                source = source / m["subPath"]
            mounts.append((source, m["mountPath"], read_only or m.get("readOnly", False)))
        if "kube-api-access" in volumes and KUBE_API_ACCESS not in mounted:
            mounts.append((volumes["kube-api-access"][0], KUBE_API_ACCESS, True))
        lines = [f"echo {shlex.quote(pod.name)} > /proc/sys/kernel/hostname"]
        for _, target, _ in mounts:
            if self.workdir.is_relative_to(target):
                raise PodFailure(f"{container.where()}: mountPath {target} would hide the runner's {self.workdir}")
        for source, target, read_only in mounts:
            self._mount_point(target, pathlib.Path(source).is_dir())
            lines.append(f"{TOOLS['mount']} --bind {shlex.quote(str(source))} {shlex.quote(target)}")
            if read_only:
                lines.append(f"{TOOLS['mount']} -o remount,bind,ro {shlex.quote(target)}")
        if (container.spec.get("securityContext") or {}).get("readOnlyRootFilesystem"):
            lines.append(f"{TOOLS['mount']} -o remount,bind,ro /")
        uid, gid, groups = container.user
        lines.append("exec " + " ".join(shlex.quote(a) for a in setpriv(uid, gid, groups, container.spec)) + ' -- "$@"')
        cmd = [TOOLS["nsenter"], f"--net=/run/netns/{pod.netns}", "--", TOOLS["unshare"], "--mount", "--uts",
               "--propagation", "private", "--", "/bin/sh", "-ec", "\n".join(lines), container.name, *argv]
        log = open(container.log_path, "ab")
        container.process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, cwd="/")
        log.close()
        threading.Thread(target=self._watch, args=(pod, container), daemon=True, name=f"watch {pod.name}/{container.name}").start()

    def _watch(self, pod, container):
        code = container.process.wait()
        container.exit_code = code
        if container.stopping or pod.stop.is_set() or self.closed or container.role == "init":
            return
        self.fail(f"{container.where()}: exited with code {code} (restartPolicy "
                  f"{container.spec.get('restartPolicy', pod.spec.get('restartPolicy', 'Always'))}); last log lines:\n{container.log()}")
        self.readiness_changed(pod)

    def _mount_point(self, target, is_dir):
        path = pathlib.Path(target)
        if path.exists():
            return
        missing = []
        p = path if is_dir else path.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            try:
                p.mkdir()
                self.network.created_dir(p)
            except FileExistsError:
                pass
        if not is_dir and not path.exists():
            path.touch()
            self.network.created_dir(path)

    # -- volumes ---------------------------------------------------------------------------------

    def _write(self, directory, files, mode, gid):
        directory.mkdir(parents=True, exist_ok=True)
        for rel, (data, item_mode) in files.items():
            path = directory / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            m = item_mode if item_mode is not None else mode
            if gid is not None:
                # Kubelet's volume ownership: group fsGroup, group-readable.
                os.chown(path, 0, gid)
                m |= 0o440
            os.chmod(path, m)

    def _items(self, where, kind, name, items, optional, data_of):
        store = self.secrets if kind == "secret" else self.configmaps
        if name not in store:
            if optional:
                return {}
            raise PodFailure(f"{where}: {kind} {name!r} not found (the pod would stay ContainerCreating)")
        data = {k: data_of(v) for k, v in store[name].items()}
        if not items:
            return {k: (v, None) for k, v in data.items()}
        out = {}
        for item in items:
            if item["key"] not in data:
                if optional:
                    continue
                raise PodFailure(f"{where}: {kind} {name!r} has no key {item['key']!r}")
            out[item["path"]] = (data[item["key"]], item.get("mode"))
        return out

    def _writable(self, path, gid):
        path.mkdir(parents=True, exist_ok=True)
        if gid is None:
            os.chmod(path, 0o777)
        else:
            os.chown(path, 0, gid)
            os.chmod(path, 0o2775)

    def _volumes(self, pod):
        """{volume name: (host directory, read-only)} laid out under the pod's directory."""
        gid = self._fs_group(pod)
        where = f"pod {pod.name}"
        raw = lambda v: v if isinstance(v, bytes) else v.encode()
        out = {}
        for volume in pod.spec.get("volumes", []):
            d = pod.dir / "volumes" / volume["name"]
            if "configMap" in volume or "secret" in volume:
                kind = "configMap" if "configMap" in volume else "secret"
                src = volume[kind]
                name = src["name"] if kind == "configMap" else src["secretName"]
                files = self._items(where, "configmap" if kind == "configMap" else "secret", name, src.get("items"),
                                    src.get("optional"), raw)
                self._write(d, files, src.get("defaultMode", 0o644), gid)
                out[volume["name"]] = (d, True)
            elif "projected" in volume:
                files = {}
                for source in volume["projected"]["sources"]:
                    if "configMap" in source or "secret" in source:
                        kind = "configMap" if "configMap" in source else "secret"
                        src = source[kind]
                        files.update(self._items(where, "configmap" if kind == "configMap" else "secret", src["name"],
                                                 src.get("items"), src.get("optional"), raw))
                    elif "serviceAccountToken" in source:
                        t = source["serviceAccountToken"]
                        sa = pod.spec.get("serviceAccountName", "default")
                        files[t["path"]] = (token(pod.namespace, sa, t.get("audience", API_AUDIENCE)).encode(), None)
                    elif "downwardAPI" in source:
                        for item in source["downwardAPI"]["items"]:
                            files[item["path"]] = (self._value_from(pod, pod.containers[0], {"fieldRef": item["fieldRef"]}, {}).encode(), item.get("mode"))
                    else:
                        raise PodFailure(f"{where}: unsupported projected source {sorted(source)}")
                self._write(d, files, volume["projected"].get("defaultMode", 0o644), gid)
                out[volume["name"]] = (d, True)
            elif "emptyDir" in volume:
                self._writable(d, gid)
                out[volume["name"]] = (d, False)
            elif "persistentVolumeClaim" in volume:
                claim = self.workdir / "claims" / volume["persistentVolumeClaim"]["claimName"]
                self._writable(claim, gid)
                out[volume["name"]] = (claim, volume["persistentVolumeClaim"].get("readOnly", False))
            else:
                raise PodFailure(f"{where}: unsupported volume {volume['name']}: {sorted(volume)}")
        if pod.workload["kind"] == "StatefulSet":
            for template in pod.workload["spec"].get("volumeClaimTemplates", []):
                # The claim <template>-<pod> outlives the pod: a recreated pod gets it back.
                claim = self.workdir / "claims" / f"{template['metadata']['name']}-{pod.name}"
                self._writable(claim, gid)
                out[template["metadata"]["name"]] = (claim, False)
        automount = pod.spec.get("automountServiceAccountToken")
        if automount is None:
            sa = self.service_accounts.get(pod.spec.get("serviceAccountName", "default"), {})
            automount = sa.get("automountServiceAccountToken", True)
        if automount:
            d = pod.dir / "volumes" / "kube-api-access"
            sa = pod.spec.get("serviceAccountName", "default")
            self._write(d, {"token": (token(pod.namespace, sa, API_AUDIENCE).encode(), None),
                            "ca.crt": (self.api.ca_file.read_bytes(), None),
                            "namespace": (pod.namespace.encode(), None)}, 0o644, gid)
            out["kube-api-access"] = (d, True)
        return out

    def _may_review(self, bearer):
        """RBAC as rendered: a ServiceAccount token whose account is bound to a role that may
        create tokenreviews."""
        parsed = parse_token(bearer)
        if not parsed or parsed[2] != API_AUDIENCE:
            return False
        namespace, account = parsed[0], parsed[1]
        roles = {r["metadata"]["name"]: r for r in self._kind("ClusterRole") + self._kind("Role")}
        for binding in self._kind("ClusterRoleBinding") + self._kind("RoleBinding"):
            subjects = binding.get("subjects", [])
            if not any(s["kind"] == "ServiceAccount" and s["name"] == account and s.get("namespace", self.namespace) == namespace
                       for s in subjects):
                continue
            role = roles.get(binding["roleRef"]["name"], {})
            for rule in role.get("rules", []):
                if ("authentication.k8s.io" in rule.get("apiGroups", []) and "tokenreviews" in rule.get("resources", [])
                        and {"create", "*"} & set(rule.get("verbs", []))):
                    return True
        return False

    # -- Services: names and kube-proxy ---------------------------------------------------------

    def live_pods(self):
        return [p for p in self.pods if p.phase in ("Pending", "Running")]

    def endpoints(self, service, ready=None):
        """Pods behind a Service: selected, running, ready (unless publishNotReadyAddresses)."""
        selector = service["spec"].get("selector")
        if not selector:
            return []
        every = service["spec"].get("publishNotReadyAddresses", False)
        ready = ready if ready is not None else {p: p.ready for p in self.live_pods()}
        return [p for p in self.live_pods() if p.phase == "Running" and p.ip and p.namespace == self.namespace
                and selects({"matchLabels": selector}, p.labels) and (every or ready.get(p))]

    def target_port(self, pod, service_port):
        target = service_port.get("targetPort", service_port["port"])
        if isinstance(target, int):
            return target
        for c in pod.containers:
            for p in c.spec.get("ports", []):
                if p.get("name") == target:
                    return p["containerPort"]
        return None

    def names(self, name, namespace, for_namespace):
        fqdn = f"{name}.{namespace}.svc.{self.cluster_domain}"
        forms = [fqdn, fqdn + ".", f"{name}.{namespace}.svc", f"{name}.{namespace}"]
        return ([name] if namespace == for_namespace else []) + forms

    def _sync(self):
        """Rewrites every namespace's hosts file and Service rules from the current endpoints.
        Called with the lock held, whenever a pod appears, goes or changes readiness."""
        if self.closed or not hasattr(self, "network"):
            return
        entries = []  # (ip, name, namespace)
        rules = []
        ready = {p: p.ready for p in self.live_pods()}
        for pod, value in ready.items():
            if value != pod.published_ready:
                self.event(f"pod {pod.name} {'ready' if value else 'not ready'}")
        for svc in self.services:
            name = svc["metadata"]["name"]
            pods = self.endpoints(svc, ready)
            if name in self.vips:
                entries.append((self.vips[name], name, self.namespace))
                for port in svc["spec"].get("ports", []):
                    if port.get("protocol", "TCP") != "TCP":
                        continue
                    eps = [(p.ip, self.target_port(p, port)) for p in pods]
                    rules.append((self.vips[name], port["port"], sorted(e for e in eps if e[1])))
            else:
                entries += [(p.ip, name, self.namespace) for p in pods]
                for p in pods:
                    if p.spec.get("subdomain") == name and p.spec.get("hostname"):
                        entries.append((p.ip, f"{p.spec['hostname']}.{name}", self.namespace))
        rules_text = net.service_rules(rules)
        targets = [(p.netns, p.dir, p.namespace, p) for p in self.live_pods() if p.netns]
        targets += [(c.netns, c.dir, c.namespace, None) for c in self.clients]
        for netns, directory, namespace, pod in targets:
            lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
            if pod:
                own = [pod.name] + ([f"{pod.name}.{pod.spec['subdomain']}.{namespace}.svc.{self.cluster_domain}"]
                                    if pod.spec.get("subdomain") else [])
                lines.append(f"{pod.ip}\t{' '.join(own)}")
            for ip, name, ns in sorted(entries):
                lines.append(f"{ip}\t{' '.join(self.names(name, ns, namespace))}")
            hosts = "\n".join(lines) + "\n"
            if self._synced.get((netns, "hosts")) != hosts:
                net.write_in_place(directory / "hosts", hosts)
                self._synced[(netns, "hosts")] = hosts
            if not (directory / "resolv.conf").exists():
                search = f"{namespace}.svc.{self.cluster_domain} svc.{self.cluster_domain} {self.cluster_domain}"
                # No DNS server: every name is in /etc/hosts, and a miss fails at once.
                (directory / "resolv.conf").write_text(f"search {search}\nnameserver 127.0.0.1\noptions ndots:5 timeout:1 attempts:1\n")
            if self._synced.get((netns, "rules")) != rules_text:
                try:
                    net.nft(netns, rules_text)
                    self._synced[(netns, "rules")] = rules_text
                except RuntimeError:
                    if os.path.exists(f"/run/netns/{netns}"):
                        raise
        for pod, value in ready.items():
            pod.published_ready = value

    def readiness_changed(self, pod):
        with self.lock:
            if pod.ready and not pod.was_ready:
                pod.was_ready = True
            self._sync()

    # -- what tests use --------------------------------------------------------------------------

    def client(self, name, namespace, labels=None):
        with self.lock:
            client = Client(self, name, namespace, labels or {})
            self.clients.append(client)
            self._sync()
        return client

    def pods_of(self, component):
        return [p for p in self.live_pods() if p.component == component]

    def pod(self, name):
        [found] = [p for p in self.live_pods() if p.name == name]
        return found

    def service_address(self, name, port_name=None):
        [svc] = [s for s in self.services if s["metadata"]["name"] == name]
        ports = svc["spec"]["ports"]
        port = next(p for p in ports if port_name in (None, p.get("name")))
        return f"{name}.{self.namespace}.svc.{self.cluster_domain}:{port['port']}"

    def desired(self):
        return {w["metadata"]["name"]: self.replicas(w) for w in self.workloads}

    def wait_ready(self, timeout=90):
        """Waits until every workload has its replicas, all ready; fails naming what is not."""
        end = time.monotonic() + timeout
        while True:
            self.check()
            live = self.live_pods()
            counts = {name: sum(1 for p in live if p.workload["metadata"]["name"] == name and p.published_ready)
                      for name in self.desired()}
            if counts == self.desired():
                return
            if time.monotonic() > end:
                short = {n: f"{counts[n]}/{d}" for n, d in self.desired().items() if counts[n] != d}
                unready = [p for p in live if not p.published_ready]
                headlines = [line for p in unready for line in p.why_not_ready()]
                details = "\n".join(p.status() for p in unready)
                raise PodFailure(f"not ready within {timeout}s: {short}\n" + "\n".join(headlines) + f"\ndetails:\n{details}")
            time.sleep(0.1)

    def assert_every_probe_passed(self, timeout=30):
        """Every probe of every live pod has succeeded at least once at its rendered port and path."""
        end = time.monotonic() + timeout
        while True:
            self.check()
            pending = [(p, c, probe) for p in self.live_pods() for c in p.containers for probe in c.probes.values()
                       if probe.total_ok == 0]
            if not pending:
                return
            if time.monotonic() > end:
                raise PodFailure("probes that never passed:\n" + "\n".join(
                    f"pod {p.name} container {c.name}: {probe.kind} {probe.describe()}: {probe.last_error}"
                    for p, c, probe in pending))
            time.sleep(0.1)

    def assert_declared_ports_listen(self):
        """Every containerPort a ready pod declares has a listener on the pod's address (what its
        Services and probes rely on): a template whose port and listen address disagree fails here,
        naming the pod and container. Read from the pod's sockets (ss), not by connecting, so it
        leaves no connection for the NetworkPolicy audit."""
        problems = []
        for pod in self.live_pods():
            if not pod.published_ready:
                continue
            out = net.sh("nsenter", f"--net=/run/netns/{pod.netns}", "--", "ss", "-Hltn").stdout
            listening = set()
            for line in out.splitlines():
                local = line.split()[3]
                addr, port = local.rsplit(":", 1)
                listening.add((addr.strip("[]"), int(port)))
            for c in pod.containers:
                for declared in c.spec.get("ports", []):
                    if declared.get("protocol", "TCP") != "TCP":
                        continue
                    port = declared["containerPort"]
                    if not any(p == port and a in ("0.0.0.0", "*", "::", pod.ip) for a, p in listening):
                        name = f"{declared['name']} ({port})" if "name" in declared else str(port)
                        problems.append(f"pod {pod.name} container {c.name}: containerPort {name} has no listener on "
                                        f"{pod.ip} (listening: {sorted(f'{a}:{p}' for a, p in listening)})")
        if problems:
            raise PodFailure("\n".join(problems))

    class _Disruption:
        def __init__(self, cluster):
            self.cluster = cluster

        def __enter__(self):
            with self.cluster.lock:
                self.cluster.disrupting += 1
                self.cluster.event("disruption begins")

        def __exit__(self, *exc):
            with self.cluster.lock:
                self.cluster.disrupting -= 1
                self.cluster.event("disruption ends")

    def disruption(self):
        """While it lasts, a ready pod turning unready is expected (e.g. its database is down)."""
        return self._Disruption(self)

    def _stop_containers(self, pod, grace):
        """Main containers first, then sidecars in reverse order, as kubelet stops a pod."""
        order = [c for c in pod.containers if c.role == "main"] + [c for c in reversed(pod.containers) if c.role == "sidecar"]
        groups = [[c for c in order if c.role == "main"], [c for c in order if c.role == "sidecar"]]
        for group in groups:
            for c in group:
                c.stopping = True
                if c.running:
                    try:
                        os.kill(c.process.pid, c.stop_signal)
                    except ProcessLookupError:
                        pass
            end = time.monotonic() + grace
            for c in group:
                if c.process is None:
                    continue
                try:
                    c.process.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                # What is left of the container (its children) dies with it, as with its PID namespace.
                try:
                    os.killpg(c.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                c.process.wait()

    def delete_pod(self, pod):
        """`kubectl delete pod`: out of every Service at once, containers stopped (SIGTERM, then
        SIGKILL after the grace period), the namespace removed; then the pod's controller
        creates its replacement (a StatefulSet's under the same name, with the same claims).
        Returns the replacement."""
        with self.lock:
            pod.phase = "Terminating"
            self.event(f"pod {pod.name} deleted")
            self._sync()
        pod.stop.set()
        self._stop_containers(pod, grace=min(pod.spec.get("terminationGracePeriodSeconds", 30), 15))
        pod.flows = net.flows(pod.netns)
        self.network.remove_namespace(pod.netns, pod.host_end)
        with self.lock:
            pod.phase = "Deleted"
        if pod.workload["kind"] == "Pod":
            return None
        replacement = self._new_pod(pod.workload, pod.ordinal)
        threading.Thread(target=self._boot, args=(replacement,), daemon=True, name=f"boot {replacement.name}").start()
        return replacement

    # -- NetworkPolicy check -----------------------------------------------------------------------

    def connections(self):
        """Every TCP connection seen so far: (source peer, destination peer, port), from the
        flow records of every namespace (deleted pods' included)."""
        peers = {p.ip: p.peer() for p in self.pods if p.ip}
        peers.update({c.ip: c.peer() for c in self.clients})
        node = Peer(self.network.node_ip, name="the node (kubelet, API server)")
        peers[self.network.node_ip] = node
        lookup = lambda ip: peers.get(ip) or Peer(ip, name=ip)
        seen = set()
        out = []
        owners = [(p, p.flows or (net.flows(p.netns) if p.phase in ("Pending", "Running") and p.netns else None)) for p in self.pods]
        owners += [(c, net.flows(c.netns)) for c in self.clients]
        for owner, flows in owners:
            if not flows:
                continue
            for ip, port in flows["ingress"]:
                key = (ip, owner.ip, port)
                if key not in seen:
                    seen.add(key)
                    out.append((lookup(ip), lookup(owner.ip), port))
            for ip, port in flows["egress"]:
                key = (owner.ip, ip, port)
                if key not in seen:
                    seen.add(key)
                    out.append((lookup(owner.ip), lookup(ip), port))
        return out

    def policy_verdicts(self):
        """[(source, destination, port, admitted, why)] for every connection seen. Both ends'
        policies must admit it (egress of a pod source, ingress of a pod destination). From the
        node only kubelet's probes are expected: admitted on the destination's probe ports."""
        pods_by_ip = {p.ip: p for p in self.pods if p.ip}
        out = []
        for src, dst, port in self.connections():
            verdicts = []
            if src.ip == self.network.node_ip:
                pod = pods_by_ip.get(dst.ip)
                ok = pod is not None and port in pod.probe_ports()
                verdicts.append((ok, "kubelet probe port" if ok else f"the node reached port {port}, which no probe uses"))
            elif src.is_pod:
                verdicts.append(admits(self.policies, "Egress", src, dst, port, self.namespace))
            if dst.is_pod and src.ip != self.network.node_ip:
                verdicts.append(admits(self.policies, "Ingress", dst, src, port, self.namespace))
            ok = all(v[0] for v in verdicts)
            why = "; ".join(v[1] for v in verdicts if v[0] == ok) or "no policy applies"
            out.append((src, dst, port, ok, why))
        return out
