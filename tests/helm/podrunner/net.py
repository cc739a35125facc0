"""Network namespaces, veths, a bridge and nftables for the pod runner, and cleanup of all of them.

Every object a run creates carries the prefix `mmpr-<run>-` (netns, links) and is listed in a
state file /run/mmpr/<run>.json naming the owning process, so a later run removes what an
interrupted one left behind (and never touches a live run's objects).
"""

import ctypes
import ipaddress
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import threading
import time

PREFIX = "mmpr"
STATE_DIR = pathlib.Path("/run/mmpr")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def sh(*argv, check=True, input=None, timeout=30):
    """Runs a command; on failure raises with its stderr (these are setup steps, not tests)."""
    result = subprocess.run([str(a) for a in argv], input=input, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def in_netns(netns, fn, *args, timeout=60):
    """Runs fn(*args) in a thread switched into the named network namespace (setns is per
    thread for network namespaces), so sockets it opens live there; returns or raises its result."""
    out = {}

    def target():
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns}")
            finally:
                os.close(fd)
            out["value"] = fn(*args)
        except BaseException as e:  # handed to the caller
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{fn.__name__} in {netns} took over {timeout}s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _netns_names():
    return [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.strip()]


def _link_names():
    links = json.loads(sh("ip", "-j", "link", "show").stdout or "[]")
    return [link["ifname"] for link in links]


def _kill_netns_processes(netns):
    pids = [int(p) for p in sh("ip", "netns", "pids", netns, check=False).stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_run(run, state=None):
    """Removes every object of one run: processes in its namespaces, links, namespaces, the
    mount points it created on the host, its work directory, its state file."""
    prefix = f"{PREFIX}-{run}-"
    for netns in _netns_names():
        if netns.startswith(prefix):
            _kill_netns_processes(netns)
    for link in _link_names():
        if link.startswith(prefix):
            sh("ip", "link", "del", link, check=False)
    for netns in _netns_names():
        if netns.startswith(prefix):
            sh("ip", "netns", "del", netns, check=False)
    state = state or {}
    if not _other_live_runs(run):
        # Mount points are shared by concurrent runs: only the last one out removes them.
        for path in sorted(state.get("created_dirs", []), key=len, reverse=True):
            try:
                os.rmdir(path)
            except OSError:
                pass
    workdir = state.get("workdir")
    if workdir and pathlib.Path(workdir).name.startswith(prefix):
        shutil.rmtree(workdir, ignore_errors=True)
    (STATE_DIR / f"{run}.json").unlink(missing_ok=True)


def _states():
    if not STATE_DIR.exists():
        return {}
    out = {}
    for path in STATE_DIR.glob("*.json"):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            out[path.stem] = {}
    return out


def _other_live_runs(run):
    return [r for r, s in _states().items() if r != run and pid_alive(s.get("pid", 0))]


def remove_leftovers():
    """Removes what interrupted runs left: runs whose owner is dead, and prefixed objects that no
    state file claims."""
    states = _states()
    live = {r for r, s in states.items() if pid_alive(s.get("pid", 0))}
    for run, state in states.items():
        if run not in live:
            remove_run(run, state)
    orphans = set()
    for name in _netns_names() + _link_names():
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == PREFIX and parts[1] not in live:
            orphans.add(parts[1])
    for run in orphans:
        remove_run(run)


class Network:
    """One bridge in the root namespace with a private /24, and a namespace per pod on it.

    The root namespace (the "node") holds .1; pods get .2 upwards, never reused in a run (a
    recreated pod gets a new address, as in a cluster); Service virtual IPs come from .200 up."""

    def __init__(self):
        remove_leftovers()
        self._lock = threading.Lock()  # pods boot in parallel
        self.run = "%04x" % random.randrange(16**4)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        # Named by the run, so that a later run finds it if this one is killed. Not under /tmp:
        # pods mount emptyDirs there, which would hide the volumes' sources.
        self.workdir = pathlib.Path("/var/tmp") / f"{PREFIX}-{self.run}-work"
        self.state = {"pid": os.getpid(), "workdir": str(self.workdir), "created_dirs": []}
        self.subnet = self._pick_subnet()
        self.state["subnet"] = str(self.subnet)
        self._save()
        self.workdir.mkdir(mode=0o755)
        os.chmod(self.workdir, 0o755)  # traversable by the pods' users
        hosts = list(self.subnet.hosts())
        self.node_ip = str(hosts[0])
        self._pod_ips = iter(str(h) for h in hosts[1:199])
        self._service_ips = iter(str(h) for h in hosts[199:])
        self._n = 0
        self.bridge = f"{PREFIX}-{self.run}-br"
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.node_ip}/{self.subnet.prefixlen}", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    def _save(self):
        with self._lock:
            path = STATE_DIR / f"{self.run}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state))
            tmp.rename(path)

    def _pick_subnet(self):
        """A 10.244.X.0/24 that no host route and no live run uses."""
        routes = json.loads(sh("ip", "-j", "-4", "route", "show", "table", "all").stdout or "[]")
        taken = []
        for route in routes:
            dst = route.get("dst", "")
            if dst in ("default", "") or not dst[0].isdigit():
                continue
            taken.append(ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False))
        for state in _states().values():
            if state.get("subnet") and pid_alive(state.get("pid", 0)):
                taken.append(ipaddress.ip_network(state["subnet"]))
        for x in random.sample(range(100, 250), 150):
            net = ipaddress.ip_network(f"10.244.{x}.0/24")
            if not any(net.overlaps(t) for t in taken):
                return net
        raise RuntimeError("no free 10.244.X.0/24 for the pod network")

    def created_dir(self, path):
        """Records a directory this run created on the host (a mount point), for removal."""
        with self._lock:
            self.state["created_dirs"].append(str(path))
        self._save()

    def service_ip(self):
        return next(self._service_ips)

    def add_namespace(self):
        """A new namespace with eth0 on the bridge and lo up, and flow recording: every TCP
        connection opened into it (source, port) and out of it (destination, port)."""
        self._n += 1
        netns = f"{PREFIX}-{self.run}-{self._n}"
        host_end, pod_end = f"{PREFIX}-{self.run}-v{self._n}", f"{PREFIX}-{self.run}-p{self._n}"
        ip = next(self._pod_ips)
        sh("ip", "netns", "add", netns)
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", pod_end)
        sh("ip", "link", "set", pod_end, "netns", netns)
        sh("ip", "-n", netns, "link", "set", pod_end, "name", "eth0")
        sh("ip", "-n", netns, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "link", "set", host_end, "master", self.bridge, "up")
        # No default route: nothing in a pod can reach beyond this /24.
        nft(netns, FLOWS_TABLE)
        return netns, ip, host_end

    def remove_namespace(self, netns, host_end):
        _kill_netns_processes(netns)
        sh("ip", "link", "del", host_end, check=False)
        sh("ip", "netns", "del", netns, check=False)

    def close(self):
        remove_run(self.run, self.state)


# The SYN of every TCP connection into (iif not lo) and out of the namespace. Output runs after
# the Service NAT (priority -100), so it sees the pod a Service address was translated to.
FLOWS_TABLE = """
table inet mmpr_flows {
  set ingress { type ipv4_addr . inet_service; flags dynamic; size 65535; }
  set egress { type ipv4_addr . inet_service; flags dynamic; size 65535; }
  chain input {
    type filter hook input priority -150;
    iif != "lo" tcp flags & (syn | ack) == syn update @ingress { ip saddr . tcp dport }
  }
  chain output {
    type filter hook output priority 10;
    oif != "lo" tcp flags & (syn | ack) == syn update @egress { ip daddr . tcp dport }
  }
}
"""


def nft(netns, text):
    sh("nsenter", f"--net=/run/netns/{netns}", "--", "nft", "-f", "-", input=text)


def flows(netns):
    """{"ingress": {(source ip, port)}, "egress": {(destination ip, port)}} recorded so far."""
    out = {}
    for direction in ("ingress", "egress"):
        text = sh("nsenter", f"--net=/run/netns/{netns}", "--", "nft", "-j", "list", "set", "inet", "mmpr_flows", direction).stdout
        found = set()
        for item in json.loads(text)["nftables"]:
            for element in item.get("set", {}).get("elem", []):
                value = element["elem"]["val"] if isinstance(element, dict) and "elem" in element else element
                addr, port = value["concat"]
                found.add((addr, int(port)))
        out[direction] = found
    return out


def service_rules(rules):
    """The kube-proxy of one namespace, as one nftables transaction: [(vip, port, [(ip, port)])].
    Connections to a Service address are translated to one ready endpoint at random; with none,
    refused (as kube-proxy rejects a Service without endpoints)."""
    nat, reject = [], []
    for vip, port, endpoints in rules:
        match = f"ip daddr {vip} tcp dport {port}"
        if not endpoints:
            reject.append(f"    {match} reject with tcp reset")
        elif len(endpoints) == 1:
            nat.append(f"    {match} dnat ip to {endpoints[0][0]}:{endpoints[0][1]}")
        else:
            choices = ", ".join(f"{i} : {ip} . {p}" for i, (ip, p) in enumerate(endpoints))
            nat.append(f"    {match} dnat ip to numgen random mod {len(endpoints)} map {{ {choices} }}")
    body = "\n".join(["  chain nat_out {", "    type nat hook output priority -100;", *nat, "  }",
                      "  chain filter_out {", "    type filter hook output priority 0;", *reject, "  }"])
    return f"table ip mmpr_svc\ndelete table ip mmpr_svc\ntable ip mmpr_svc {{\n{body}\n}}\n"


def write_in_place(path, text):
    """Rewrites a file that is bind-mounted elsewhere (a rename would leave the mounts on the old
    file): one write from offset 0, padded with blank lines to at least the old length so that no
    reader sees a shorter file, never a truncation to empty first."""
    data = text.encode()
    path = pathlib.Path(path)
    old = path.stat().st_size if path.exists() else 0
    if len(data) < old:
        data += b"\n" * (old - len(data))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


def wait_until(check, timeout, interval=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(interval)
    return check()
