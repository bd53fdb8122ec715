"""A cluster of five "servers" on this machine: network namespaces on one
virtual switch, each running an agent with fake GPUs. Kernels start on
server h1 (where "Jupyter" runs) and place their other replicas through the
agents; then one server is cut off and its replicas must be replaced
elsewhere with nothing lost; then every GPU of a kernel's servers is taken
(held through the agents by a stand-in for other kernels) and its next GPU
cell must migrate a replica to the free server and run there; then the
live autoscaler drains an idle server and asks for one when GPUs run out.

    python tests/cluster/netns.py --json REPORT     (root, iproute2)

Layout: namespace ``<tag>-sw`` holds bridge br0; host ``<tag>-hN`` has eth0 =
10.79.0.N/24, whose veth peer swpN is a bridge port. Cutting a server sets
its switch port down: its packets vanish, as with a pulled cable.
"""

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

SERVERS = 5


# Short, so the test sees orphans stopped; long enough for a front to register
# after its peers start, or to come back after a restart.
REJOIN_GRACE = 20
# How long a kernel with no room waits for servers (cluster.json's
# `place_wait_s`): long enough for the autoscaler to hear of it.
PLACE_WAIT = 20


def sh(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True)


def ns(tag, n):
    return f"{tag}-h{n}"


def setup(tag):
    sw = f"{tag}-sw"
    sh("ip", "netns", "add", sw)
    sh("ip", "netns", "exec", sw, "ip", "link", "add", "br0", "type", "bridge")
    sh("ip", "netns", "exec", sw, "ip", "link", "set", "br0", "up")
    for n in range(1, SERVERS + 1):
        h = ns(tag, n)
        sh("ip", "netns", "add", h)
        sh("ip", "link", "add", f"{tag[-6:]}e{n}", "type", "veth", "peer", "name", f"{tag[-6:]}p{n}")
        sh("ip", "link", "set", f"{tag[-6:]}e{n}", "netns", h)
        sh("ip", "link", "set", f"{tag[-6:]}p{n}", "netns", sw)
        sh("ip", "netns", "exec", h, "ip", "link", "set", f"{tag[-6:]}e{n}", "name", "eth0")
        sh("ip", "netns", "exec", h, "ip", "addr", "add", f"10.79.0.{n}/24", "dev", "eth0")
        sh("ip", "netns", "exec", h, "ip", "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", h, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", sw, "ip", "link", "set", f"{tag[-6:]}p{n}", "master", "br0")
        sh("ip", "netns", "exec", sw, "ip", "link", "set", f"{tag[-6:]}p{n}", "up")


def teardown(tag):
    for n in range(1, SERVERS + 1):
        sh("ip", "netns", "del", ns(tag, n), check=False)
    sh("ip", "netns", "del", f"{tag}-sw", check=False)


def cut(tag, n, up=False):
    sh("ip", "netns", "exec", f"{tag}-sw", "ip", "link", "set", f"{tag[-6:]}p{n}",
       "up" if up else "down")


def hog(socket_path, gpus, patience=30):
    """Holds `gpus` GPUs of an agent, as another kernel's cell would: while
    the agent reclaims them from a kernel that keeps its state cached on
    them, it asks again."""
    import socket as so

    deadline = time.monotonic() + patience
    while True:
        c = so.socket(so.AF_UNIX)
        c.connect(str(socket_path))
        c.sendall(json.dumps({"op": "grant", "kernel": "hog", "replica": 0, "gpus": gpus,
                              "lease_ms": 600_000}).encode() + b"\n")
        answer = json.loads(c.makefile().readline())
        c.close()
        if "granted" in answer:
            return answer["granted"]["id"]
        reclaiming = answer.get("refused", {}).get("reclaiming")
        assert reclaiming and time.monotonic() < deadline, answer
        time.sleep(0.05)


def release(socket_path, grant):
    import socket as so

    c = so.socket(so.AF_UNIX)
    c.connect(str(socket_path))
    c.sendall(json.dumps({"op": "release", "id": grant, "used_ms": 0}).encode() + b"\n")
    c.makefile().readline()
    c.close()


@contextlib.contextmanager
def cluster(tmp):
    """Five servers with agents (2 fake GPUs each); yields (tag, the kernel
    environment for a front on h1)."""
    from conftest import KERNEL_BIN

    tag = f"nbc{os.getpid() % 100000}"
    sh(str(KERNEL_BIN), "cluster", "new-ca", str(tmp / "ca.pem"))
    config = tmp / "cluster.json"
    config.write_text(json.dumps({
        "ca": "ca.pem",
        # A kernel that finds no room waits this long for servers.
        "place_wait_s": PLACE_WAIT,
        "servers": [{"name": f"h{n}", "agent": f"10.79.0.{n}:7400"}
                    for n in range(1, SERVERS + 1)],
    }))
    agents = []
    setup(tag)
    try:
        for n in range(1, SERVERS + 1):
            log = open(tmp / f"agent-h{n}.log", "w")
            agents.append(subprocess.Popen(
                ["ip", "netns", "exec", ns(tag, n), str(KERNEL_BIN), "agent", "--fake-gpus", "2",
                 "--socket", str(tmp / f"h{n}" / "agent.sock"), "--cluster", str(config),
                 "--name", f"h{n}", "--rejoin-grace", str(REJOIN_GRACE)],
                stdout=log, stderr=subprocess.STDOUT,
                # The replicas an agent starts embed its host's Python environment,
                # as a kernelspec's env names it for replica 1.
                env={**os.environ, "NOTEBOOKOS_PYTHON": sys.executable}))
        # The front runs on h1 and takes its GPUs from h1's agent.
        yield tag, {"NOTEBOOKOS_CLUSTER": str(config), "NOTEBOOKOS_SERVER": "h1",
                    "NOTEBOOKOS_AGENT_SOCKET": str(tmp / "h1" / "agent.sock")}
    finally:
        for a in agents:
            a.terminate()
        for a in agents:
            try:
                a.wait(timeout=10)
            except subprocess.TimeoutExpired:
                a.kill()
        teardown(tag)
        for log in sorted(tmp.glob("agent-*.log")):
            # A cut-off server makes every agent warn every few seconds: the
            # distinct lines, not their repetitions, say what happened.
            seen = {}
            for line in log.read_text().splitlines():
                if "ERROR" in line or "WARN" in line:
                    seen.setdefault(line.split(" ", 1)[-1], line)
            if seen:
                print(f"--- {log.name}\n" + "\n".join(list(seen.values())[-8:]), file=sys.stderr)


def orphaned_replicas_are_stopped(kernel):
    """Replica 1 dies and Jupyter does not restart it: once the rejoin grace
    has passed, the agents stop the kernel's replicas on their servers."""
    from replicas import alive

    peers = [m["pid"] for m in kernel.group()["members"] if m["id"] != kernel.front()]
    os.kill(kernel.pid(kernel.front()), signal.SIGKILL)
    t = time.monotonic()
    while any(alive(p) for p in peers):
        assert time.monotonic() - t < REJOIN_GRACE + 30, f"replicas {peers} outlive their kernel"
        time.sleep(0.5)
    return {"peers": peers, "stopped_after_s": round(time.monotonic() - t, 1)}


def outer(args):
    tmp = Path(tempfile.mkdtemp(prefix="nbos-cluster-"))
    with cluster(tmp) as (tag, _):
        inner = subprocess.run(
            ["ip", "netns", "exec", ns(tag, 1), sys.executable, __file__, "--inside",
             "--tag", tag, "--tmp", str(tmp), "--json", args.json],
            stderr=subprocess.PIPE, text=True)
    # Last, after the agents' logs: where a failure is read first.
    sys.stderr.write(inner.stderr)
    return inner.returncode


def inside(args):
    import conftest
    from replicas import ReplicatedKernel

    conftest.pytest_configure(None)
    tmp = Path(args.tmp)
    env = {"NOTEBOOKOS_CLUSTER": str(tmp / "cluster.json"), "NOTEBOOKOS_SERVER": "h1",
           "NOTEBOOKOS_AGENT_SOCKET": str(tmp / "h1" / "agent.sock")}
    report = {"kernels": [], "cut": None, "replaced": None, "verify": None, "values": None}
    kernels = [ReplicatedKernel(tmp / f"k{i}", env=env) for i in range(2)]
    try:
        for k in kernels:
            hosts = {m["id"]: m.get("host") for m in k.group()["members"]}
            report["kernels"].append(hosts)
        k = kernels[0]
        assert k.fe.execute("x = 41\nimport numpy as np\nbig = np.arange(200_000)")[0]["status"] == "ok"
        victim_id = k.peers()[0]
        victim = {m["id"]: m.get("host") for m in k.group()["members"]}[victim_id]
        report["cut"] = victim
        args.cut = victim
        cut(args.tag, int(victim[1:]))
        # The front notices through the agent, declares it down, places a
        # replacement on a server the kernel does not use.
        deadline = time.monotonic() + 120
        while True:
            members = {m["id"]: m.get("host") for m in k.group()["members"]}
            if victim_id not in members and len(members) == 3:
                break
            assert time.monotonic() < deadline, members
            time.sleep(0.5)
        k.wait_members(3, timeout=120)
        report["replaced"] = {m["id"]: m.get("host") for m in k.group()["members"]}
        k.fe.execute("x += 1")
        report["verify"] = k.verify()
        report["values"] = [k.eval("x"), k.eval("int(big.sum())")]

        # Every GPU of this kernel's servers is taken: the next GPU cell
        # waits, then one replica migrates to the free server and runs it.
        used = set(report["replaced"].values())
        grants = {h: hog(tmp / h / "agent.sock", 2) for h in sorted(used)}
        reply, msgs = k.fe.execute(
            "%%gpus 1\nimport os\nmigrated = x * 2\nprint(os.environ['NOTEBOOKOS_AGENT_SOCKET'])",
            timeout=180)
        from frontend import stream_text

        for h, g in grants.items():
            release(tmp / h / "agent.sock", g)
        report["migration"] = {
            "status": reply["status"],
            "stderr": "".join(m["content"]["text"] for m in msgs
                              if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"),
            "stdout": stream_text([m for m in msgs if m["msg_type"] == "stream"
                                   and m["content"]["name"] == "stdout"]),
            "hosts_before": sorted(used),
            "hosts_after": sorted({m.get("host") for m in k.group()["members"]}),
        }
        k.wait_members(3, timeout=120)
        report["migration"]["value"] = k.eval("migrated")
        report["migration"]["verify"] = k.verify()

        report["rebalance"] = rebalance(tmp, k)
        report["autoscale"] = autoscale(args, tmp, kernels)
        report["orphans"] = orphaned_replicas_are_stopped(kernels[1])
    finally:
        for k in kernels:
            k.close()
    # Nothing of either kernel is left running.
    from replicas import alive

    deadline = time.monotonic() + 30
    seen = set().union(*(k.seen_pids for k in kernels))
    while any(alive(p) for p in seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    report["leftover"] = sorted(p for p in seen if alive(p))
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


def rebalance(tmp, k):
    """Between cells, every GPU of the kernel's servers is taken: a replica
    moves to the free server before the next cell, which then starts there
    without waiting for a migration."""
    from frontend import stream_text

    before = sorted({m.get("host") for m in k.group()["members"]})
    grants = {h: hog(tmp / h / "agent.sock", 2) for h in before}
    try:
        deadline = time.monotonic() + 90
        while True:
            after = sorted({m.get("host") for m in k.group()["members"]})
            if after != before and len(after) == 3:
                break
            assert time.monotonic() < deadline, f"no replica moved off {before}"
            time.sleep(0.5)
        moved_s = round(90 - (deadline - time.monotonic()), 1)
        # The user thinks meanwhile: the newcomer catches up before the cell.
        k.wait_members(3, timeout=120)
        reply, msgs = k.fe.execute(
            "%%gpus 1\nimport os\nahead = migrated + 1\nprint(os.environ['NOTEBOOKOS_AGENT_SOCKET'])",
            timeout=120)
    finally:
        for h, g in grants.items():
            release(tmp / h / "agent.sock", g)
    out = {
        "hosts_before": before,
        "hosts_after": after,
        "moved_after_s": moved_s,
        "status": reply["status"],
        "stderr": "".join(m["content"]["text"] for m in msgs
                          if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"),
        "stdout": stream_text([m for m in msgs if m["msg_type"] == "stream"
                               and m["content"]["name"] == "stdout"]),
    }
    k.wait_members(3, timeout=120)
    out["value"] = k.eval("ahead")
    out["verify"] = k.verify()
    return out


def autoscale(args, tmp, kernels):
    """The live autoscaler with fast knobs: the idle cluster drains one
    server (its replicas move) and gives it back; then every GPU is taken
    and it asks for a server."""
    from conftest import KERNEL_BIN

    added, removed = tmp / "added", tmp / "removed"
    scaler = subprocess.Popen(
        [str(KERNEL_BIN), "cluster", "autoscale", str(tmp / "cluster.json"),
         "--add", f"echo $NOTEBOOKOS_SCALE_OUT >> {added}; echo h6",
         "--remove", f"echo $NOTEBOOKOS_SERVER >> {removed}",
         "--every", "1", "--cooldown", "5", "--headroom", "0", "--scale-in-after", "3",
         "--from", "10.79.0.1"],
        stderr=open(tmp / "autoscale.log", "w"))
    out = {}
    try:
        deadline = time.monotonic() + 120
        while not (removed.exists() and removed.read_text().strip()):
            assert time.monotonic() < deadline, (tmp / "autoscale.log").read_text()[-3000:]
            time.sleep(0.5)
        out["removed"] = removed.read_text().split()
        for k in kernels:
            k.wait_members(3, timeout=120)
        out["hosts_after_drain"] = [sorted({m.get("host") for m in k.group()["members"]})
                                    for k in kernels]
        out["verify"] = kernels[0].verify()
        out["value"] = kernels[0].eval("migrated")
        out["no_room"] = no_room(tmp, added)
        added.write_text("")
        # Every GPU of the servers still up is taken: demand crosses the threshold.
        up = [f"h{n}" for n in range(1, SERVERS + 1) if f"h{n}" != args.cut]
        grants = {h: hog(tmp / h / "agent.sock", 2) for h in up}
        deadline = time.monotonic() + 60
        while "1" not in added.read_text().split():
            assert time.monotonic() < deadline, (tmp / "autoscale.log").read_text()[-3000:]
            time.sleep(0.5)
        out["added"] = added.read_text().split()
        for h, g in grants.items():
            release(tmp / h / "agent.sock", g)
    finally:
        scaler.terminate()
        scaler.wait(timeout=10)
    return out


def no_room(tmp, added):
    """A kernel whose replicas ask for 3 GPUs, more than any server has: its
    front waits for servers and its agent lists it, so the autoscaler asks
    for two; after `place_wait_s` it runs as a single replica and says so."""
    from conftest import KERNEL_BIN
    from frontend import Frontend

    env = {**os.environ, "NOTEBOOKOS_CLUSTER": str(tmp / "cluster.json"),
           "NOTEBOOKOS_SERVER": "h1", "NOTEBOOKOS_AGENT_SOCKET": str(tmp / "h1" / "agent.sock"),
           "NOTEBOOKOS_STATE_DIR": str(tmp / "k-big"), "NOTEBOOKOS_REPLICAS": "3",
           "NOTEBOOKOS_KERNEL_GPUS": "3"}
    fe = Frontend(env=env)
    out = {}
    try:
        msg_id = fe.kc.execute("print('ran')")
        deadline = time.monotonic() + 60
        listed = []
        while not listed:
            assert time.monotonic() < deadline, "h1's agent never listed the waiting kernel"
            status = subprocess.run([str(KERNEL_BIN), "cluster", "status", str(tmp / "cluster.json"),
                                     "--from", "10.79.0.1"], capture_output=True, text=True)
            listed = [u for inv in json.loads(status.stdout or "[]") if inv["name"] == "h1"
                      for u in inv.get("unplaced", [])]
            time.sleep(0.5)
        out["listed"] = listed
        while not (added.exists() and added.read_text().strip()):
            assert time.monotonic() < deadline, (tmp / "autoscale.log").read_text()[-3000:]
            time.sleep(0.5)
        out["asked"] = added.read_text().split()
        reply = fe.shell_reply(msg_id, PLACE_WAIT + 60)
        msgs = fe.iopub_until_idle(msg_id, 30)
        out["status"] = reply["content"]["status"]
        out["stderr"] = "".join(m["content"]["text"] for m in msgs
                                if m["msg_type"] == "stream" and m["content"]["name"] == "stderr")
    finally:
        fe.close()
    # Its agent no longer lists it; give a round in flight time to finish.
    time.sleep(3)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--inside", action="store_true")
    ap.add_argument("--tag")
    ap.add_argument("--tmp")
    args = ap.parse_args()
    sys.exit(inside(args) if args.inside else outer(args))


if __name__ == "__main__":
    main()
