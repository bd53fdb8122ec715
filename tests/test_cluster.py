"""Agents of a cluster over QUIC: three agents (fake GPUs) serve the cluster
control protocol with the cluster's mutual TLS; `cluster status` asks each
for its inventory; an agent that is gone is left out, not fatal."""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from conftest import KERNEL_BIN, ROOT


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(config):
    out = subprocess.run([str(KERNEL_BIN), "cluster", "status", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def test_agents_report_inventory_over_quic(tmp_path):
    ca = tmp_path / "ca.pem"
    subprocess.run([str(KERNEL_BIN), "cluster", "new-ca", str(ca)], check=True, timeout=30)
    assert stat.S_IMODE(ca.stat().st_mode) == 0o600
    names = ["s1", "s2", "s3"]
    config = tmp_path / "cluster.json"
    config.write_text(json.dumps({
        "ca": "ca.pem",
        "servers": [{"name": n, "agent": f"127.0.0.1:{free_udp_port()}"} for n in names],
    }))
    agents = {
        n: subprocess.Popen([str(KERNEL_BIN), "agent", "--fake-gpus", "2", "--socket",
                             str(tmp_path / n / "agent.sock"), "--cluster", str(config),
                             "--name", n])
        for n in names
    }
    try:
        deadline = time.monotonic() + 30
        while True:
            inventories, _ = status(config)
            if len(inventories) == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert [i["name"] for i in inventories] == names
        for i in inventories:
            assert (i["gpus"], i["idle_gpus"], i["replicas"], i["draining"]) == (2, 2, [], False)

        agents["s2"].send_signal(signal.SIGKILL)
        agents["s2"].wait(timeout=10)
        inventories, stderr = status(config)
        assert [i["name"] for i in inventories] == ["s1", "s3"]
        assert "s2" in stderr and "unreachable" in stderr

        # Misconfigured: an agent whose name is not in the config says so and exits.
        bad = subprocess.run([str(KERNEL_BIN), "agent", "--fake-gpus", "1", "--socket",
                              str(tmp_path / "x" / "agent.sock"), "--cluster", str(config),
                              "--name", "nope"], capture_output=True, text=True, timeout=30)
        assert bad.returncode != 0 and "no server named \"nope\"" in bad.stderr
    finally:
        for p in agents.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=10)


def test_kubernetes_daemonset_runs_the_agent_with_the_nodes_gpus():
    import yaml

    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "notebookos-agent.yaml").read_text()))
    [ds] = [d for d in docs if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    [agent] = pod["containers"]
    args = agent["args"]
    assert args[0] == "agent"
    # Every flag the manifest passes is one the agent accepts: run its parser.
    flags = dict(zip(args[1::2], args[2::2]))
    assert set(flags) == {"--cluster", "--name", "--socket", "--metrics"}
    out = subprocess.run([str(KERNEL_BIN), "agent", "--help"], capture_output=True,
                         text=True, timeout=30)
    for flag in flags:
        assert flag in out.stdout, (flag, out.stdout)
    assert int(agent["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert pod["hostNetwork"] is True
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert os.path.dirname(flags["--cluster"]) in mounts


def test_replicas_on_distinct_servers_and_a_cut_off_server_is_replaced(tmp_path):
    """Five servers as network namespaces (tests/cluster/netns.py): two
    kernels each get 3 distinct servers; cutting one server off gets its
    replicas replaced on a server the kernel did not use, state intact; a
    kernel whose servers are all full migrates a replica and runs its cell;
    between cells, the same kernel moves a replica ahead of its next cell;
    the autoscaler drains and removes an idle server, asks for the servers a
    kernel with no room waits for, and asks for one when every GPU is
    taken."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 for network namespaces")
    report_file = tmp_path / "report.json"
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "cluster" / "netns.py"),
                          "--json", str(report_file)], capture_output=True, text=True, timeout=600)
    assert report_file.exists(), run.stdout[-3000:] + run.stderr[-5000:]
    report = json.loads(report_file.read_text())
    for hosts in report["kernels"]:
        assert len(set(hosts.values())) == 3 and "h1" in hosts.values(), report
    cut = report["cut"]
    replaced = report["replaced"]
    assert cut not in replaced.values() and len(set(replaced.values())) == 3, report
    assert report["verify"].startswith("all 3 replicas hold the same namespace"), report
    assert report["values"] == ["42", "19999900000"], report
    # All GPUs of the kernel's servers taken: its GPU cell waited, a replica
    # migrated to the one free server, and the cell ran there.
    m = report["migration"]
    assert m["status"] == "ok", m
    [free] = {"h1", "h2", "h3", "h4", "h5"} - set(m["hosts_before"]) - {cut}
    assert "queued" in m["stderr"] and f"to {free}, which has 1 free GPU" in m["stderr"], m
    assert m["stdout"].strip().endswith(f"/{free}/agent.sock"), m
    assert free in m["hosts_after"] and len(m["hosts_after"]) == 3, m
    assert m["value"] == "84" and m["verify"].startswith("all 3 replicas"), m
    # Between cells, with every GPU of its servers taken, a replica moved to
    # the free server ahead of the next cell, which ran there at once.
    r = report["rebalance"]
    [free] = set(r["hosts_after"]) - set(r["hosts_before"])
    assert free != cut and len(r["hosts_after"]) == 3 and "h1" in r["hosts_after"], r
    assert r["status"] == "ok" and "queued" not in r["stderr"] and "migrating" not in r["stderr"], r
    assert r["stdout"].strip().endswith(f"/{free}/agent.sock"), r
    assert r["value"] == "85" and r["verify"].startswith("all 3 replicas"), r
    # The autoscaler drained one idle server (never h1, where the kernels'
    # replica 1 runs) and gave it back; the kernels moved off it, nothing
    # lost; with every GPU taken it asked the provider for one server.
    a = report["autoscale"]
    [gone] = a["removed"]
    assert gone not in ("h1", cut), a
    for hosts in a["hosts_after_drain"]:
        assert gone not in hosts and len(hosts) == 3 and "h1" in hosts, a
    assert a["verify"].startswith("all 3 replicas") and a["value"] == "84", a
    assert a["added"][-1] == "1", a
    # A kernel no server had room for (3 GPUs each, servers of 2): its
    # agent listed it while it waited, the autoscaler asked for the two
    # servers it lacked, and after `place_wait_s` it ran alone, saying so.
    w = a["no_room"]
    assert [(u["gpus"], u["missing"], u["hosts"]) for u in w["listed"]] == [(3, 2, ["h1"])], w
    assert "2" in w["asked"], w
    assert w["status"] == "ok" and "runs as a single replica" in w["stderr"], w
    # A kernel whose replica 1 died for good: the agents stopped its replicas.
    assert len(report["orphans"]["peers"]) == 2, report["orphans"]
    # And nothing of either kernel outlives the run.
    assert report["leftover"] == [], report["leftover"]
    assert run.returncode == 0, run.stderr[-3000:]
