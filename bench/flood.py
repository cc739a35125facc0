#!/usr/bin/env python3
"""Memory after a connection flood: a proxy's RSS before, at the peak of
2,000 open HTTP/2 connections, and 30 s after they all closed.

Usage: bench/flood.py MESH_JSON [CONNECTIONS] [WAIT_SECONDS] [TARGET]
TARGET is `gateway` (default) or `SERVICE-REPLICA` for that instance's
sidecar outbound listener (e.g. order-0). Needs `ulimit -n` above CONNECTIONS.
Loopback only: the addresses come from the mesh's own mesh.json.
"""
import asyncio
import json
import sys

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def target(mesh, name):
    if name == "gateway":
        return mesh["gateway"]["addr"], mesh["gateway"]["pid"]
    service, replica = name.rsplit("-", 1)
    for instance in mesh["instances"]:
        if instance["service"] == service and str(instance["replica"]) == replica:
            return instance["outbound"], instance["sidecar_pid"]
    sys.exit(f"no instance {name} in mesh.json")


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def flood(addr, pid, count, wait):
    host, port = addr.rsplit(":", 1)
    before = rss_mib(pid)
    conns = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(PREFACE)
        conns.append(writer)
    await asyncio.sleep(2)
    peak = rss_mib(pid)
    for writer in conns:
        writer.close()
    await asyncio.sleep(wait)
    after = rss_mib(pid)
    print(json.dumps({"connections": count, "rss_mib": {"before": round(before, 1),
                      "peak": round(peak, 1), f"{wait}s_after_close": round(after, 1)}}))


def main():
    mesh = json.load(open(sys.argv[1]))
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    wait = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    addr, pid = target(mesh, sys.argv[4] if len(sys.argv) > 4 else "gateway")
    asyncio.run(flood(addr, pid, count, wait))


if __name__ == "__main__":
    main()
