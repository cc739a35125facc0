#!/usr/bin/env python3
"""Where one configuration of bench/orders.sh spends its time (PROFILE=1).

  orders_profile.py snapshot UP_PID [POSTMASTER_PID] > FILE
      CPU seconds so far of every process of one `minimesh up` (by role:
      each service, the sidecars, the gateway) and of one PostgreSQL server
      (the postmaster and every process it started).
  orders_profile.py report BEFORE AFTER ORDERS BENCH_JSON [WAITS]
      CPU milliseconds per order by role between the two snapshots (ORDERS:
      orders created in between, warm-up included, as is the client's CPU
      from BENCH_JSON), and, given the output of the wait sampler, how many
      PostgreSQL backends were on average in each state and wait event.
"""
import json
import os
import sys

TICKS = os.sysconf("SC_CLK_TCK")


def processes():
    """pid -> (ppid, cpu seconds, argv) of every readable process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        # The command name may contain spaces: fields start after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        ppid, utime, stime = int(fields[1]), int(fields[11]), int(fields[12])
        table[int(name)] = (ppid, (utime + stime) / TICKS, argv)
    return table


def descendants(table, root):
    children = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def role(argv):
    # Children of `up` are this binary run with a subcommand.
    sub = argv[1] if len(argv) > 1 else ""
    if sub == "service" and len(argv) > 2:
        return f"service {argv[2]}"
    if sub in ("sidecar", "gateway", "identity"):
        return {"sidecar": "sidecars"}.get(sub, sub)
    return "up"


def snapshot(up_pid, postmaster_pid=None):
    table = processes()
    cpu = {}
    for pid in descendants(table, up_pid):
        r = role(table[pid][2])
        cpu[r] = cpu.get(r, 0.0) + table[pid][1]
    if postmaster_pid:
        for pid in descendants(table, postmaster_pid):
            cpu["postgres"] = cpu.get("postgres", 0.0) + table[pid][1]
    return cpu


def waits(path):
    """Mean backends per sample in each 'state wait_type:wait_event'."""
    samples, counts = 0, {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line == "#":
                samples += 1
            elif line:
                counts[line] = counts.get(line, 0) + 1
    return samples, {k: v / max(samples, 1) for k, v in counts.items()}


def report(before_path, after_path, orders, bench_json, waits_path=None):
    with open(before_path) as f:
        before = json.load(f)
    with open(after_path) as f:
        after = json.load(f)
    with open(bench_json) as f:
        client = json.load(f).get("client_cpu_s") or 0.0
    orders = max(int(orders), 1)
    per_order = {r: (after[r] - before.get(r, 0.0)) * 1000 / orders for r in after}
    per_order["client"] = client * 1000 / orders
    total = sum(per_order.values())
    parts = ", ".join(f"{r} {ms:.2f}" for r, ms in sorted(per_order.items(), key=lambda x: -x[1]))
    print(f"   CPU ms per order ({orders} orders): total {total:.2f}: {parts}")
    if waits_path:
        samples, mean = waits(waits_path)
        top = sorted(mean.items(), key=lambda x: -x[1])[:8]
        text = ", ".join(f"{k} {v:.2f}" for k, v in top)
        print(f"   PostgreSQL backends per sample ({samples} samples): {text}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "snapshot":
        json.dump(snapshot(int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None), sys.stdout)
    elif len(sys.argv) >= 6 and sys.argv[1] == "report":
        report(*sys.argv[2:7])
    else:
        sys.exit(__doc__)
