"""Chaos run: a generated notebook through notebookos's 3 replicas while
replicas are killed, frozen and restarted and packets are dropped; at the
end the namespace must equal that of the same notebook on ipykernel.

    python tests/chaos/run.py [--cells 200] [--faults 5] [--seed 1] [--netns] [--json FILE]

Faults (chosen and placed by the seed, one kind after another):
- kill_peer: a peer gets SIGKILL between cells (replaced, invisible);
- kill_running: the replica running a cell gets SIGKILL mid-cell; the cell
  must end with a ReplicaLost error, and is then run again, as a user would;
- kill_front: replica 1 gets SIGKILL and Jupyter restarts it; it rejoins;
- freeze_peer: a peer is stopped (SIGSTOP) for 5 cells: to the others, a host
  cut off by a partition; then it resumes and catches up;
- kill_streaming: the replica that ran a cell making a 200 MB value gets
  SIGKILL right after the reply, while the cell's changes stream to the
  others; the next cell must say which cells' changes were lost, and the
  user re-runs those (no notice: nothing was lost);
- drop_packets (with --netns): for 5 cells the namespace's loopback is shaped
  by a token bucket (tc tbf) that drops what exceeds it. (This machine's
  kernel has no netem; tbf tail drops are real packet loss.)

With --netns the whole run (client, kernel, replicas) moves into a network
namespace it creates, so shaping touches nothing else. With --cluster it
runs on five "servers" (network namespaces on a virtual switch, each with
an agent; tests/cluster/netns.py): replica 1 on h1, the peers placed by
the policy; then `partition` replaces freeze_peer: a peer's server is cut
off from the switch for 16 s (long enough to be declared lost and
replaced) and comes back, and packets are dropped on h1's link.

It prints a report and exits non-zero if a variable was lost, a cell errored
without saying why, or a faulted cell's error does not name the fault.
"""

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import conftest  # noqa: E402  (kernel binary and kernelspecs)
from frontend import Frontend, stream_text  # noqa: E402
from notebook import FINGERPRINT, cells  # noqa: E402
from replicas import ReplicatedKernel  # noqa: E402

KINDS = ["kill_peer", "kill_running", "freeze_peer", "drop_packets", "kill_front",
         "kill_streaming"]
CLUSTER_KINDS = ["kill_peer", "kill_running", "partition", "drop_packets", "kill_front",
                 "kill_streaming"]
# Appended to a cell so that its changes take a while to reach the others.
BIG_VALUE = "\n_chaos_big = bytearray(200 << 20)"
LOST_CELLS = re.compile(r"the changes of (.*?) reached another replica")
WINDOW = 5
PARTITION_SECONDS = 16


def status(reply):
    return reply["status"] if reply["status"] == "ok" else f"error:{reply.get('ename')}"


def fingerprint(fe):
    reply, msgs = fe.execute(FINGERPRINT, silent=True, timeout=120)
    assert reply["status"] == "ok", reply
    return json.loads(stream_text(msgs))


def reference(notebook):
    fe = Frontend(kernel_name="python3")
    try:
        statuses = [status(fe.execute(c, timeout=120)[0]) for c in notebook]
        return statuses, fingerprint(fe)
    finally:
        fe.close()


def plan(n_cells, n_faults, seed, netns, cluster):
    rng = random.Random(seed)
    kinds = CLUSTER_KINDS if cluster else [k for k in KINDS if netns or k != "drop_packets"]
    # Far enough apart that each fault's replacement catches up first.
    slots = list(range(5, n_cells - WINDOW, max(1, (n_cells - 10) // max(1, n_faults))))
    at = sorted(rng.sample(slots, min(n_faults, len(slots))))
    order = [kinds[i % len(kinds)] for i in range(len(at))]
    rng.shuffle(order)
    return dict(zip(at, order))


DEV = "lo"


def tc(*args):
    return subprocess.run(["tc", *args], check=True, capture_output=True, text=True).stdout


def run(n_cells, n_faults, seed, netns, tmp, cluster=None):
    """`cluster`: (switch tag, the kernel's cluster environment)
    file the agents' replicas read), or None."""
    notebook = cells(n_cells, seed)
    ref_status, ref_fp = reference(notebook)
    faults = plan(n_cells, n_faults, seed, netns, cluster)
    report = {
        "cells": n_cells, "seed": seed, "cells_run": 0, "faults": {},
        "fault_errored": [], "unexpected": [], "packets_dropped": 0, "changes_lost_told": [],
    }
    # In [n] -> the code that ran as it, to re-run what a loss names.
    ran_as = {}
    rk = ReplicatedKernel(Path(tmp) / "chaos", env=cluster[1] if cluster else None)
    frozen = None
    shaping_until = None
    try:
        for i, cell in enumerate(notebook):
            if frozen and i >= frozen[1]:
                os.kill(frozen[0], signal.SIGCONT)
                frozen = None
            if shaping_until is not None and i >= shaping_until:
                stats = tc("-s", "qdisc", "show", "dev", DEV)
                report["packets_dropped"] += int(stats.split("dropped ")[1].split(",")[0])
                tc("qdisc", "del", "dev", DEV, "root")
                shaping_until = None
            kind = faults.get(i)
            if kind:
                print(f"[chaos] cell {i}: {kind}", file=sys.stderr, flush=True)
                report["faults"][kind] = report["faults"].get(kind, 0) + 1
                if frozen is None:
                    rk.wait_members(3)
            if kind == "kill_peer":
                rk.steer(rk.front())
                rk.kill(rk.peers()[0])
            elif kind == "partition":
                import netns as cluster_netns

                server = {m["id"]: m.get("host") for m in rk.group()["members"]}[rk.peers()[0]]
                cluster_netns.cut(cluster[0], int(server[1:]))
                cut_at = time.monotonic()
                report.setdefault("partitioned", []).append(server)
            elif kind == "freeze_peer":
                pid = rk.pid(rk.peers()[0])
                os.kill(pid, signal.SIGSTOP)
                frozen = (pid, i + WINDOW)
            elif kind == "drop_packets":
                tc("qdisc", "replace", "dev", DEV, "root", "tbf", "rate", "8mbit",
                   "burst", "16kb", "latency", "20ms")
                shaping_until = i + WINDOW
                # Cells' own traffic is small; a value of a few MB that replica
                # 1 sends makes the bulk stream burst past the bucket for certain
                # (in a cluster only replica 1's link is shaped).
                burst = "_chaos_burst = bytes(4 << 20)"
                rk.steer(rk.front())
                reply, _ = rk.fe.execute(burst, timeout=300)
                rk.unsteer()
                ran_as[reply.get("execution_count")] = burst
            elif kind == "kill_front":
                rk.kill_front_and_restart()
            elif kind == "kill_streaming":
                victim = rk.peers()[-1]
                rk.steer(victim)
                reply, _ = rk.fe.execute(cell + BIG_VALUE, timeout=300)
                rk.kill_now(victim)
                rk.unsteer()
                report["cells_run"] += 1
                ran_as[reply.get("execution_count")] = cell
                _, msgs = rk.fe.execute("pass", timeout=300)
                told = LOST_CELLS.search(stream_text(msgs, "stderr"))
                counts = [int(n) for n in re.findall(r"In \[(\d+)\]", told.group(1))] if told else []
                report["changes_lost_told"].append({"cell": i, "in": counts})
                # As a user would: re-run the cells the notice names, in order.
                for n in counts:
                    if n not in ran_as:
                        report["unexpected"].append({"cell": i, "fault": kind, "unknown In": n})
                        continue
                    again, _ = rk.fe.execute(ran_as[n], timeout=300)
                    report["cells_run"] += 1
                    ran_as[again.get("execution_count")] = ran_as[n]
                continue
            elif kind == "kill_running":
                victim = rk.peers()[-1]
                rk.steer(victim)
                msg_id = rk.fe.kc.execute("import time as _t\n_t.sleep(3)\n" + cell)
                rk.fe.wait_for(msg_id, "execute_input", timeout=60)
                time.sleep(0.5)
                rk.kill(victim)
                reply = rk.fe.shell_reply(msg_id, timeout=120)["content"]
                rk.fe.iopub_until_idle(msg_id, timeout=120)
                report["cells_run"] += 1
                said = f"{reply.get('ename')}: {reply.get('evalue')}"
                report["fault_errored"].append({"cell": i, "error": said})
                rk.unsteer()
                if reply.get("ename") != "ReplicaLost" or "namespace is as before" not in said:
                    # It ran to the end after all: running it again would run it twice.
                    report["unexpected"].append({"cell": i, "fault": kind, "got": said})
                    continue
            reply, _ = rk.fe.execute(cell, timeout=300)
            report["cells_run"] += 1
            ran_as[reply.get("execution_count")] = cell
            if kind == "partition":
                # Long enough to be declared lost and replaced; then it is back.
                time.sleep(max(0.0, PARTITION_SECONDS - (time.monotonic() - cut_at)))
                cluster_netns.cut(cluster[0], int(server[1:]), up=True)
            if kind == "kill_peer":
                rk.unsteer()
            if status(reply) != ref_status[i]:
                report["unexpected"].append(
                    {"cell": i, "fault": kind, "got": status(reply), "ipykernel": ref_status[i]})
        if frozen:
            os.kill(frozen[0], signal.SIGCONT)
        if shaping_until is not None:
            tc("qdisc", "del", "dev", DEV, "root")
        rk.unsteer()
        rk.wait_members(3)
        rk.verify()
        got = fingerprint(rk.fe)
    finally:
        rk.close()
    lost = sorted(k for k in ref_fp if got.get(k) != ref_fp[k])
    extra = sorted(k for k in got if k not in ref_fp)
    report.update(variables_compared=len(ref_fp), variables_lost=lost, variables_extra=extra)
    return report


def in_cluster(argv):
    """Re-runs this script on server h1 of a five-server cluster."""
    sys.path.insert(0, str(HERE.parent / "cluster"))
    import netns as cluster_netns

    tmp = Path(tempfile.mkdtemp(prefix="nbos-chaos-cluster-"))
    with cluster_netns.cluster(tmp) as (tag, env):
        return subprocess.run(["ip", "netns", "exec", cluster_netns.ns(tag, 1), sys.executable,
                               __file__, *argv, "--inside", "--tag", tag,
                               "--kernel-env", json.dumps(env)]).returncode


def in_namespace(argv):
    """Re-runs this script inside a fresh network namespace."""
    name = f"nbos-chaos-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        return subprocess.run(["ip", "netns", "exec", name, sys.executable, __file__,
                               *argv, "--inside"]).returncode
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=200)
    ap.add_argument("--faults", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--netns", action="store_true")
    ap.add_argument("--cluster", action="store_true")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    ap.add_argument("--kernel-env", help=argparse.SUPPRESS)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.cluster and not args.inside:
        sys.exit(in_cluster(sys.argv[1:]))
    if args.netns and not args.inside:
        sys.exit(in_namespace(sys.argv[1:]))
    cluster = None
    if args.cluster:
        global DEV
        DEV = "eth0"
        sys.path.insert(0, str(HERE.parent / "cluster"))
        cluster = (args.tag, json.loads(args.kernel_env))
    # The notebookos kernelspecs, as the tests have them; "python3" is
    # ipykernel's own, in this environment.
    conftest.pytest_configure(None)
    with tempfile.TemporaryDirectory(prefix="nbos-chaos-") as tmp:
        report = run(args.cells, args.faults, args.seed, args.netns or args.cluster, tmp, cluster)
    ok = not report["variables_lost"] and not report["unexpected"]
    report["ok"] = ok
    text = json.dumps(report, indent=1)
    print(text)
    print(f"chaos: {report['cells_run']} cells run ({report['cells']} in the notebook), "
          f"faults {report['faults']}, {len(report['fault_errored'])} cells errored because of "
          f"a fault (each says ReplicaLost), {report['packets_dropped']} packets dropped, "
          f"{len(report['variables_lost'])} of {report['variables_compared']} variables lost: "
          f"{'OK' if ok else 'FAILED'}")
    if args.json:
        Path(args.json).write_text(text + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
