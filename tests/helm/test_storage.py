"""Where the chart's services keep their data (CONTRACT §4).

SQLite by default (one volume per pod, one replica per service: more fails the render), the chart's
own PostgreSQL (`postgresql.enabled`), or an existing one (`externalDatabase.existingSecret`);
with a database, services are Deployments with any number of replicas or an autoscaler, and read
their URL from a Secret only. The rendered init script runs against a real PostgreSQL 15.
"""

import base64
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

import helm_python
import pytest
import yaml

import test_chart as chart
from test_chart import by_kind, effective, env_of, install, service_workloads
from test_identity_live import FakeApiServer

CI = chart.CHART / "ci"
REPLICAS_VALUES = yaml.safe_load((CI / "replicas-values.yaml").read_text())
EXTERNAL_VALUES = yaml.safe_load((CI / "external-database-values.yaml").read_text())
POSTGRESQL = {"postgresql": {"enabled": True}}


def with_replicas(base, **replicas):
    values = json.loads(json.dumps(base))
    services = values.setdefault("services", {})
    for service, n in replicas.items():
        services.setdefault(service, {})["replicas"] = n
    return values


def decoded(secret):
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def the(objects, kind, name):
    [found] = [o for o in by_kind(objects, kind) if o["metadata"]["name"] == name]
    return found


def render_error(values):
    with pytest.raises(helm_python.HelmError) as err:
        install(values)
    return str(err.value)


# SQLite ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("service", chart.SERVICES)
def test_sqlite_with_more_than_one_replica_fails_saying_scaling_needs_postgresql(service):
    message = render_error(with_replicas({}, **{service: 3}))
    assert f"services.{service}.replicas is 3" in message
    assert "scaling needs PostgreSQL" in message
    assert "postgresql.enabled=true" in message and "externalDatabase.existingSecret" in message


def test_sqlite_with_an_autoscaler_fails_the_same_way():
    message = render_error({"services": {"order": {"autoscaling": {"enabled": True}}}})
    assert "services.order.autoscaling.enabled" in message and "scaling needs PostgreSQL" in message


def test_sqlite_keeps_one_statefulset_pod_per_service_with_its_volume():
    objects = install({})
    for service, workload in service_workloads(objects).items():
        assert workload["kind"] == "StatefulSet" and workload["spec"]["replicas"] == 1
        container = workload["spec"]["template"]["spec"]["containers"][0]
        assert env_of(container)["MINIMESH_DB"] == f"/data/{service}.db"
        [mount] = [m for m in container["volumeMounts"] if m["name"] == "data"]
        assert mount["mountPath"] == "/data"
    assert not by_kind(objects, "HorizontalPodAutoscaler")
    assert not [o for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == "postgresql"]


# With a database ----------------------------------------------------------------------------------

def test_both_databases_at_once_fail_with_a_clear_message():
    message = render_error({"postgresql": {"enabled": True}, "externalDatabase": {"existingSecret": "shop-db"}})
    assert "postgresql.enabled=true and externalDatabase.existingSecret are exclusive" in message


def assert_deployments(objects, replicas):
    workloads = service_workloads(objects)
    assert {s: w["kind"] for s, w in workloads.items()} == {s: "Deployment" for s in chart.SERVICES}
    assert {s: w["spec"].get("replicas") for s, w in workloads.items()} == replicas
    for service, workload in workloads.items():
        spec = workload["spec"]["template"]["spec"]
        assert "volumeClaimTemplates" not in workload["spec"] and "serviceName" not in workload["spec"]
        assert "data" not in {v["name"] for v in spec["volumes"]}
        assert not [m for c in chart.all_containers(spec) for m in c.get("volumeMounts", []) if m["name"] == "data"]
        # No init container waits for the database (the service reports NOT_SERVING meanwhile).
        assert [c["name"] for c in spec.get("initContainers", [])] in ([], ["sidecar"]), service
    return workloads


def database_ref(workload):
    container = workload["spec"]["template"]["spec"]["containers"][0]
    [entry] = [e for e in container["env"] if e["name"] == "MINIMESH_DB"]
    assert set(entry) == {"name", "valueFrom"}, "never an inline value"
    return entry["valueFrom"]["secretKeyRef"]


def test_postgresql_with_2_2_3_replicas_runs_deployments_reading_their_url_from_the_secret():
    """ci/replicas-values.yaml (linted and validated strictly with every ci file) and the minimal
    values: Deployments of 2, 2 and 3 pods, each reading its own URL from the chart's Secret."""
    assert REPLICAS_VALUES["postgresql"]["enabled"] is True
    minimal = with_replicas(POSTGRESQL, user=2, order=2, payment=3)
    for values in (REPLICAS_VALUES, minimal):
        objects = install(values)
        workloads = assert_deployments(objects, {"user": 2, "order": 2, "payment": 3})
        secret_name = f"{chart.fullname(values)}-postgresql"
        urls = decoded(the(objects, "Secret", secret_name))
        host = f"{secret_name}.{chart.NAMESPACE}.svc"
        for service, workload in workloads.items():
            assert database_ref(workload) == {"name": secret_name, "key": f"{service}-url"}
            url = urllib.parse.urlsplit(urls[f"{service}-url"])
            role = f"minimesh_{service}"
            assert (url.scheme, url.username, url.hostname, url.port, url.path) == ("postgresql", role, host, 5432, f"/{role}")
            assert url.password == urls[f"{service}-password"] and len(url.password) >= 32
            assert urllib.parse.parse_qs(url.query) == {"sslmode": ["disable"]}
        # The URLs' host is the chart's PostgreSQL Service, which selects its server on 5432.
        service = the(objects, "Service", secret_name)
        server = the(objects, "StatefulSet", secret_name)
        assert service["spec"]["selector"].items() <= server["spec"]["template"]["metadata"]["labels"].items()
        [port] = service["spec"]["ports"]
        [container] = server["spec"]["template"]["spec"]["containers"]
        assert port["port"] == 5432 and port["targetPort"] in {p["name"] for p in container["ports"]}
        passwords = {urls[f"{s}-password"] for s in chart.SERVICES} | {urls["postgres-password"]}
        assert len(passwords) == 4, "one password per role"


def test_the_chart_postgresql_server():
    """Official image pinned to 15.x, run as its postgres user (999) with a read-only root
    filesystem, PGDATA a subdirectory of its volume, pg_isready probes over TCP, credentials from
    the Secret, the init script mounted where the entrypoint runs it."""
    v = effective(POSTGRESQL)["postgresql"]
    objects = install(POSTGRESQL)
    name = f"{chart.fullname({})}-postgresql"
    server = the(objects, "StatefulSet", name)
    assert server["spec"]["replicas"] == 1
    spec = server["spec"]["template"]["spec"]
    [container] = spec["containers"]
    repository, tag = container["image"].rsplit(":", 1)
    assert repository == "postgres" and re.fullmatch(r"15\.\d+(-[a-z]+)?", tag), container["image"]
    assert "alpine" not in tag, "uid 999 is the Debian image's postgres user"
    assert spec["securityContext"]["runAsUser"] == 999 and spec["securityContext"]["fsGroup"] == 999
    assert spec["automountServiceAccountToken"] is False
    assert container["args"] == ["-c", f"max_connections={v['maxConnections']}"]
    env = env_of(container)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    [claim] = server["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == v["persistence"]["size"]
    data_dir = next(path for path, volume in mounts.items() if volume == claim["metadata"]["name"])
    assert env["PGDATA"].startswith(data_dir + "/") and env["PGDATA"] != data_dir + "/"
    volumes = {vol["name"]: vol for vol in spec["volumes"]}
    for writable in ("/var/run/postgresql", "/tmp"):
        assert "emptyDir" in volumes[mounts[writable]], writable
    init = volumes[mounts["/docker-entrypoint-initdb.d"]]["configMap"]
    assert init["defaultMode"] == 0o555, "executable: run in its own shell, not sourced"
    script = the(objects, "ConfigMap", init["name"])["data"]
    assert list(script) == ["minimesh-databases.sh"]
    assert env["POSTGRES_USER"] == "postgres"
    expected = {"POSTGRES_PASSWORD": "postgres-password"} | {f"MINIMESH_{s.upper()}_PASSWORD": f"{s}-password" for s in chart.SERVICES}
    for var, key in expected.items():
        assert env[var] == {"secretKeyRef": {"name": name, "key": key}}, var
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[kind]["exec"]["command"]
        assert command[0] == "pg_isready" and "--host=127.0.0.1" in command, kind
    assert the(objects, "Secret", name)["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_external_database_reads_the_given_secret_and_key():
    assert EXTERNAL_VALUES["externalDatabase"]["secretKey"] != "url"
    for values, key in ((EXTERNAL_VALUES, EXTERNAL_VALUES["externalDatabase"]["secretKey"]),
                        ({"externalDatabase": {"existingSecret": "cluster-app"}}, "url")):
        objects = install(values)
        secret = values["externalDatabase"]["existingSecret"]
        for workload in service_workloads(objects).values():
            assert workload["kind"] == "Deployment"
            assert database_ref(workload) == {"name": secret, "key": key}
        # The chart deploys no server and writes no database Secret of its own.
        assert not [o for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == "postgresql"]
        assert secret not in {s["metadata"]["name"] for s in by_kind(objects, "Secret")}


@pytest.mark.parametrize("values", [POSTGRESQL, REPLICAS_VALUES, EXTERNAL_VALUES, {}], ids=["postgresql", "replicas", "external", "sqlite"])
def test_no_database_url_is_ever_inline(values):
    """No object carries a PostgreSQL URL in clear: not in an env value, a ConfigMap or NOTES.
    (The chart's Secret holds them, encoded as every Secret's data is.)"""
    objects = install(values)
    texts = [json.dumps(o) for o in objects] + [text for text in chart.render_all(values).values()]
    for text in texts:
        assert not re.search(r"postgres(ql)?://", text), text[:200]
    for workload in service_workloads(objects).values():
        container = workload["spec"]["template"]["spec"]["containers"][0]
        for entry in container["env"]:
            assert "postgres" not in str(entry.get("value", "")), entry


def test_autoscaling_creates_an_hpa_and_leaves_replicas_to_it():
    values = with_replicas(POSTGRESQL, user=2)
    values["services"]["order"] = {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 9, "targetCPUUtilizationPercentage": 60}}
    values["services"]["payment"] = {"autoscaling": {"enabled": True}}
    objects = install(values)
    workloads = assert_deployments(objects, {"user": 2, "order": None, "payment": None})
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in by_kind(objects, "HorizontalPodAutoscaler")
            if h["metadata"]["labels"]["app.kubernetes.io/component"] in chart.SERVICES}
    assert sorted(hpas) == sorted(workloads[s]["metadata"]["name"] for s in ("order", "payment"))
    order = hpas[workloads["order"]["metadata"]["name"]]
    assert order["apiVersion"] == "autoscaling/v2"
    assert order["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": workloads["order"]["metadata"]["name"]}
    assert (order["spec"]["minReplicas"], order["spec"]["maxReplicas"]) == (3, 9)
    [metric] = order["spec"]["metrics"]
    assert metric["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}
    payment = effective({})["services"]["payment"]["autoscaling"]
    hpa = hpas[workloads["payment"]["metadata"]["name"]]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (payment["minReplicas"], payment["maxReplicas"])
    # The ci file with an autoscaler renders it too (and is validated strictly with every ci file).
    assert [h["spec"]["scaleTargetRef"]["name"] for h in by_kind(install(EXTERNAL_VALUES), "HorizontalPodAutoscaler")
            if h["metadata"]["labels"]["app.kubernetes.io/component"] == "order"]
    assert "above maxReplicas" in render_error(
        {**POSTGRESQL, "services": {"order": {"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 2}}}})


@pytest.mark.parametrize("values", [with_replicas(POSTGRESQL, payment=3), EXTERNAL_VALUES], ids=["postgresql", "external"])
def test_disruption_budgets_cover_the_deployments(values):
    objects = install(values)
    budgets = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in by_kind(objects, "PodDisruptionBudget")}
    for service, workload in service_workloads(objects).items():
        budget = budgets[service]
        assert budget["spec"]["maxUnavailable"] == 1
        assert budget["spec"]["selector"]["matchLabels"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize(
    "bad",
    [
        {"postgresql": {"enabled": "yes"}},
        {"postgresql": {"image": {"repository": "postgres", "tag": ""}}},
        {"postgresql": {"password": "hunter2"}},
        {"postgresql": {"maxConnections": 1}},
        {"externalDatabase": {"existingSecret": "Not A Name"}},
        {"externalDatabase": {"secretKey": ""}},
        {"externalDatabase": {"url": "postgresql://u:p@db/shop"}},
        {"services": {"order": {"replicas": 1, "resources": {}, "autoscaling": {"enabled": True, "cpu": 50}}}},
        {"networkPolicy": {"databasePorts": []}},
        {"networkPolicy": {"databaseTo": [{"cidr": "10.0.0.0/8"}]}},
    ],
)
def test_schema_refuses_bad_database_values(bad):
    """In particular there is no value to give a URL or password inline."""
    with pytest.raises(helm_python.HelmError):
        install(bad)


# Network policies ---------------------------------------------------------------------------------

def policy(objects, values, short):
    return the(objects, "NetworkPolicy", f"{chart.fullname(values)}-{short}")


def test_network_policies_admit_the_service_pods_to_postgresql_on_5432():
    values = {**POSTGRESQL, "networkPolicy": {"enabled": True}}
    objects = install(values)
    pods = chart.release_pods(objects)
    server = policy(objects, values, "postgresql")
    assert {c for c, labels in pods.items() if chart.selects(server["spec"]["podSelector"], labels)} == {"postgresql"}
    [rule] = server["spec"]["ingress"]
    assert rule["ports"] == [{"port": 5432, "protocol": "TCP"}]
    [peer] = rule["from"]
    assert {c for c, labels in pods.items() if chart.selects(peer["podSelector"], labels)} == set(chart.SERVICES)
    assert server["spec"]["egress"] == [] and "Egress" in server["spec"]["policyTypes"]
    out = [r for r in policy(objects, values, "services")["spec"]["egress"] if {"port": 5432, "protocol": "TCP"} in r["ports"]]
    [rule] = out
    assert [{c for c, labels in pods.items() if chart.selects(p["podSelector"], labels)} for p in rule["to"]] == [{"postgresql"}]
    # The gateway never talks to the database.
    gateway = policy(objects, values, "gateway")["spec"]["egress"]
    assert not [r for r in gateway if {"port": 5432, "protocol": "TCP"} in r["ports"]]


def test_network_policies_let_the_services_reach_an_external_database():
    objects = install(EXTERNAL_VALUES)
    np = EXTERNAL_VALUES["networkPolicy"]
    egress = policy(objects, EXTERNAL_VALUES, "services")["spec"]["egress"]
    assert {"to": np["databaseTo"], "ports": [{"port": p, "protocol": "TCP"} for p in np["databasePorts"]]} in egress
    # Without databaseTo: the database's ports anywhere.
    values = {"externalDatabase": {"existingSecret": "db"}, "networkPolicy": {"enabled": True, "databasePorts": [5432, 6432]}}
    egress = policy(install(values), values, "services")["spec"]["egress"]
    assert {"ports": [{"port": 5432, "protocol": "TCP"}, {"port": 6432, "protocol": "TCP"}]} in egress
    assert not [p for p in by_kind(install(values), "NetworkPolicy") if p["metadata"]["name"].endswith("-postgresql")]


# Credentials kept across upgrades ---------------------------------------------------------------

def test_the_generated_passwords_are_kept_across_upgrades():
    """Rendered against an API server (Helm's `lookup` sees the cluster): without the Secret every
    render generates new passwords; once it exists, later renders reuse every password (and so
    every URL), whatever else changes, because the server's data directory was initialised with
    them. A key missing from an older Secret is generated, the others kept."""
    api = FakeApiServer()
    try:
        name = f"{chart.fullname({})}-postgresql"
        first = decoded(the(api.render(POSTGRESQL), "Secret", name))
        second = decoded(the(api.render(POSTGRESQL), "Secret", name))
        assert first["postgres-password"] != second["postgres-password"], "no Secret yet: new passwords each time"
        secret = the(api.render(POSTGRESQL), "Secret", name)
        kept = decoded(secret)
        path = f"/api/v1/namespaces/{chart.NAMESPACE}/secrets/{name}"
        ownership = {"meta.helm.sh/release-name": chart.RELEASE, "meta.helm.sh/release-namespace": chart.NAMESPACE}
        api.objects[path] = secret | {"metadata": secret["metadata"] | {"namespace": chart.NAMESPACE, "annotations": ownership}}
        for values in (POSTGRESQL, with_replicas(POSTGRESQL, user=2, order=2, payment=3) | {"networkPolicy": {"enabled": True}}):
            again = the(api.render(values), "Secret", name)
            assert decoded(again) == kept, "the existing passwords are kept"
        older = dict(secret["data"])
        del older["payment-password"]
        api.objects[path] = secret | {"data": older, "metadata": api.objects[path]["metadata"]}
        again = decoded(the(api.render(POSTGRESQL), "Secret", name))
        assert {k: again[k] for k in ("postgres-password", "user-password", "order-password")} == \
            {k: kept[k] for k in ("postgres-password", "user-password", "order-password")}
        assert again["payment-password"] != kept["payment-password"] and again["payment-password"] in again["payment-url"]
        assert not api.writes, f"a dry run wrote to the API: {api.writes}"
    finally:
        api.close()


# The init script, run for real --------------------------------------------------------------------

# Runs inside `pg_virtualenv` (PGHOST, PGPORT, PGUSER, PGPASSWORD set): the rendered init script as
# the official image's entrypoint runs it, then every service's URL from the rendered Secret,
# pointed at this server. Prints JSON for the test to check.
INSIDE = r"""
import json, os, subprocess, sys, urllib.parse
script, secret = sys.argv[1], json.loads(sys.argv[2])
env = dict(os.environ, POSTGRES_USER=os.environ["PGUSER"])
env.update({f"MINIMESH_{s.upper()}_PASSWORD": secret[f"{s}-password"] for s in ("user", "order", "payment")})
init = subprocess.run([script], env=env, capture_output=True, text=True)
out = {"init": [init.returncode, init.stderr], "services": {}}

def psql(url, sql):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    r = subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-XAt", url, "-c", sql], env=clean, capture_output=True, text=True)
    return [r.returncode, r.stdout.strip(), r.stderr.strip()]

def here(url, database=None):
    u = urllib.parse.urlsplit(url)
    netloc = f"{u.username}:{u.password}@{os.environ['PGHOST']}:{os.environ['PGPORT']}"
    path = "/" + database if database else u.path
    return urllib.parse.urlunsplit((u.scheme, netloc, path, u.query, ""))

for s in ("user", "order", "payment"):
    url = secret[f"{s}-url"]
    others = [o for o in ("user", "order", "payment") if o != s]
    out["services"][s] = {
        "whoami": psql(here(url), "SELECT current_user || ' ' || current_database()"),
        "schema": psql(here(url), f"CREATE SCHEMA IF NOT EXISTS minimesh_{s}; CREATE TABLE minimesh_{s}.t (id int); SELECT 'ok'"),
        "others": [psql(here(url, f"minimesh_{o}"), "SELECT 1") for o in others],
        "wrong_password": psql(here(url.replace(secret[f"{s}-password"], "wrong")), "SELECT 1"),
    }
print("RESULT", json.dumps(out))
"""


def test_the_init_script_gives_each_service_its_own_role_and_database():
    if not shutil.which("pg_virtualenv"):
        if os.environ.get("CI") == "true":
            pytest.fail("pg_virtualenv (Debian postgresql-common) is missing")
        pytest.skip("pg_virtualenv (Debian postgresql-common) is not installed")
    objects = install(POSTGRESQL)
    name = f"{chart.fullname({})}-postgresql"
    secret = decoded(the(objects, "Secret", name))
    [script] = the(objects, "ConfigMap", f"{name}-init")["data"].values()
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "minimesh-databases.sh"
        path.write_text(script)
        path.chmod(0o555)
        os.chmod(tmp, 0o755)  # the cluster's processes run as the postgres user
        result = subprocess.run(["pg_virtualenv", "-v", "15", sys.executable, "-c", INSIDE, str(path), json.dumps(secret)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # pg_virtualenv talks on stdout too.
    [line] = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
    out = json.loads(line.removeprefix("RESULT "))
    assert out["init"][0] == 0, out["init"][1]
    for service, checks in out["services"].items():
        role = f"minimesh_{service}"
        assert checks["whoami"] == [0, f"{role} {role}", ""], checks["whoami"]
        assert checks["schema"][0] == 0 and checks["schema"][1].endswith("ok"), checks["schema"]
        for other in checks["others"]:
            assert other[0] != 0 and "permission denied for database" in other[2], other
        assert checks["wrong_password"][0] != 0 and "password authentication failed" in checks["wrong_password"][2]


def test_notes_say_where_the_data_lives():
    def notes(values):
        return " ".join(chart.render_all(values)["minimesh/templates/NOTES.txt"].split())
    assert "SQLite on one volume per service, so one replica each" in notes({})
    assert "postgresql.enabled=true or externalDatabase.existingSecret=NAME" in notes({})
    assert "Storage: PostgreSQL shop-minimesh-postgresql" in notes(POSTGRESQL)
    assert "the PostgreSQL named in Secret shop-db (key database-url)" in notes(EXTERNAL_VALUES)
