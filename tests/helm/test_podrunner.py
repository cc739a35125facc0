"""The pod runner's own logic, without root: NetworkPolicy admission (against the policies the
chart renders), Service rules, names, the image's commands, and the hand-made protobuf of the load
client."""

import pathlib
import signal
import types

import pytest

import test_chart as chart
from podrunner import h2grpc, net
from podrunner.cluster import STOP_SIGNALS, Cluster, PodFailure
from podrunner.netpol import Peer, admits, selects

NP_VALUES = {"networkPolicy": {"enabled": True, "gatewayFrom": [
    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
    "adminFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                   "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]},
    "postgresql": {"enabled": True}}


def release_pod(objects, component, ip):
    [workload] = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")
                  and o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    spec = workload["spec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for c in chart.all_containers(spec) for p in c.get("ports", []) if "name" in p}
    return Peer(ip, chart.NAMESPACE, workload["spec"]["template"]["metadata"]["labels"], ports, name=component)


@pytest.fixture(scope="module")
def rendered():
    objects = chart.install(NP_VALUES)
    pods = {c: release_pod(objects, c, f"10.0.0.{i + 2}")
            for i, c in enumerate(["user", "order", "payment", "gateway", "identity", "postgresql"])}
    return chart.by_kind(objects, "NetworkPolicy"), pods


def both(policies, src, dst, port):
    out = admits(policies, "Ingress", dst, src, port, chart.NAMESPACE)[0]
    if src.is_pod:
        out = out and admits(policies, "Egress", src, dst, port, chart.NAMESPACE)[0]
    return out


def test_the_rendered_policies_admit_the_mesh_and_nothing_else(rendered):
    policies, pods = rendered
    ingress = Peer("10.9.0.1", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    prometheus = Peer("10.9.0.2", "monitoring", {"app.kubernetes.io/name": "prometheus"})
    grafana = Peer("10.9.0.3", "monitoring", {"app.kubernetes.io/name": "grafana"})
    intruder = Peer("10.9.0.4", chart.NAMESPACE, {"app": "intruder"})
    assert both(policies, ingress, pods["gateway"], 50051)
    assert not both(policies, intruder, pods["gateway"], 50051), "gatewayFrom: the ingress namespace only"
    assert both(policies, pods["gateway"], pods["user"], 4143)
    assert both(policies, pods["order"], pods["payment"], 4143)
    assert both(policies, pods["user"], pods["identity"], 8443)
    assert both(policies, pods["order"], pods["postgresql"], 5432)
    assert not both(policies, pods["gateway"], pods["postgresql"], 5432), "the gateway never talks to the database"
    assert both(policies, prometheus, pods["user"], 4191)
    assert not both(policies, grafana, pods["user"], 4191), "adminFrom: namespace AND pod selector"
    assert not both(policies, intruder, pods["user"], 4143)
    assert not both(policies, intruder, pods["user"], 8080)
    assert not both(policies, pods["postgresql"], pods["user"], 4143), "PostgreSQL calls nothing"
    assert both(policies, pods["identity"], Peer("10.0.0.1"), 443), "the issuer reaches the API server"
    assert not both(policies, pods["user"], Peer("10.0.0.1"), 443)


def test_admission_semantics():
    pod = Peer("10.0.0.5", "ns", {"app": "db"}, {"pg": 5432})
    client = Peer("10.1.2.3", "other", {"role": "x"})
    assert admits([], "Ingress", pod, client, 5432, "ns")[0], "nothing selects it: not isolated"

    def policy(**spec):
        return {"metadata": {"name": "p", "namespace": "ns"}, "spec": {"podSelector": {"matchLabels": {"app": "db"}}, **spec}}

    deny = policy(policyTypes=["Ingress"])
    assert not admits([deny], "Ingress", pod, client, 5432, "ns")[0]
    assert admits([deny], "Egress", pod, client, 5432, "ns")[0], "not isolated for egress"
    named = policy(ingress=[{"ports": [{"port": "pg"}]}])  # no policyTypes: Ingress
    assert admits([named], "Ingress", pod, client, 5432, "ns")[0] and not admits([named], "Ingress", pod, client, 5433, "ns")[0]
    ranged = policy(ingress=[{"ports": [{"port": 5000, "endPort": 6000}]}])
    assert admits([ranged], "Ingress", pod, client, 5432, "ns")[0]
    block = policy(ingress=[{"from": [{"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.1.2.0/24"]}}]}])
    assert not admits([block], "Ingress", pod, client, 5432, "ns")[0]
    assert admits([block], "Ingress", pod, Peer("10.1.3.3", "other"), 5432, "ns")[0]
    same_ns = policy(ingress=[{"from": [{"podSelector": {}}]}])
    assert not admits([same_ns], "Ingress", pod, client, 5432, "ns")[0], "a bare podSelector means the policy's namespace"
    assert admits([same_ns], "Ingress", pod, Peer("10.0.0.9", "ns", {}), 5432, "ns")[0]
    assert selects({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}, {"app": "db"})
    assert not selects({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, {"app": "db"})


def test_service_rules_spread_over_endpoints_and_refuse_without_any():
    text = net.service_rules([("10.0.0.200", 443, [("10.0.0.2", 50051), ("10.0.0.3", 50051)]),
                              ("10.0.0.201", 5432, [("10.0.0.4", 5432)]), ("10.0.0.202", 8443, [])])
    assert "ip daddr 10.0.0.200 tcp dport 443 dnat ip to numgen random mod 2 map { 0 : 10.0.0.2 . 50051, 1 : 10.0.0.3 . 50051 }" in text
    assert "ip daddr 10.0.0.201 tcp dport 5432 dnat ip to 10.0.0.4:5432" in text
    assert "ip daddr 10.0.0.202 tcp dport 8443 reject with tcp reset" in text
    assert text.startswith("table ip mmpr_svc\ndelete table ip mmpr_svc\n"), "replaced in one transaction"


def test_names_a_pod_resolves():
    cluster = Cluster.__new__(Cluster)
    cluster.cluster_domain = "cluster.local"
    names = cluster.names("gw", "shop", "shop")
    assert names == ["gw", "gw.shop.svc.cluster.local", "gw.shop.svc.cluster.local.", "gw.shop.svc", "gw.shop"]
    assert "gw" not in cluster.names("gw", "shop", "monitoring"), "short names are namespace-relative"


def argv_cluster(binaries):
    """A Cluster with just what _argv reads: {image binary: local copy}, MINIMESH_BIN's path."""
    cluster = Cluster.__new__(Cluster)
    cluster.binary_source = pathlib.Path("/build/target/debug/minimesh")
    cluster.binaries = {name: pathlib.Path("/run/bin") / name for name in binaries}
    return cluster


def container(spec):
    return types.SimpleNamespace(spec=spec, where=lambda: f"pod p-0 container {spec['name']}")


def test_the_image_s_commands_run_the_local_builds():
    """No command: the image's ENTRYPOINT, minimesh; /usr/local/bin/minimesh-proxy (or the name the
    image's PATH finds): the local minimesh-proxy. Each rendered proxy runs the latter."""
    cluster = argv_cluster(["minimesh", "minimesh-proxy"])

    def same(text):  # no $(VAR) to expand here
        return text

    assert cluster._argv(container({"name": "user", "args": ["service", "user"]}), "minimesh", same) == ["/run/bin/minimesh", "service", "user"]
    for command in (["/usr/local/bin/minimesh-proxy"], ["minimesh-proxy"]):
        assert cluster._argv(container({"name": "sidecar", "command": command, "args": ["sidecar"]}), "minimesh", same) == \
            ["/run/bin/minimesh-proxy", "sidecar"]
    assert cluster._argv(container({"name": "x", "command": ["/usr/local/bin/minimesh", "up"]}), "minimesh", same) == ["/run/bin/minimesh", "up"]
    for command in (["/bin/sh"], ["/usr/local/bin/kubectl"], ["/usr/bin/minimesh-proxy"], ["/usr/local/bin/minimesh-"]):
        with pytest.raises(PodFailure, match=f"pod p-0 container x: command {command[0]} is not in the image"):
            cluster._argv(container({"name": "x", "command": command}), "minimesh", same)
    objects = chart.install({})
    proxies = [proxy for _, _, proxy in chart.proxies(objects)]
    assert {cluster._argv(container(p), "minimesh", same)[0] for p in proxies} == {"/run/bin/minimesh-proxy"}
    # The minimesh image has no STOPSIGNAL: either binary gets SIGTERM.
    assert STOP_SIGNALS["minimesh"] == signal.SIGTERM


def test_a_proxy_binary_that_was_not_built_fails_its_container():
    cluster = argv_cluster(["minimesh"])
    with pytest.raises(PodFailure, match=r"pod p-0 container gateway: command /usr/local/bin/minimesh-proxy runs "
                                         r"minimesh-proxy, but /build/target/debug/minimesh-proxy was not built"):
        cluster._argv(container({"name": "gateway", "command": ["/usr/local/bin/minimesh-proxy"], "args": ["gateway"]}), "minimesh", lambda t: t)


def test_hand_made_protobuf():
    assert h2grpc.message((1, "ab")) == b"\x0a\x02ab"
    assert h2grpc.message((2, 300)) == b"\x10\xac\x02"
    assert h2grpc.message((2, ((1, "x"), (2, 1)))) == b"\x12\x05\x0a\x01x\x10\x01"


def test_write_in_place_never_shortens_what_a_reader_sees(tmp_path):
    path = tmp_path / "hosts"
    net.write_in_place(path, "10.0.0.2 a b c\n")
    inode = path.stat().st_ino
    net.write_in_place(path, "10.0.0.3 a\n")
    assert path.stat().st_ino == inode, "the same file: bind mounts keep seeing it"
    assert path.read_text().rstrip("\n") == "10.0.0.3 a"
