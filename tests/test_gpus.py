"""GPUs on demand, with a fake inventory: a host agent with 1 fake GPU shared
by two kernels (6 replicas). A cell that asks for the GPU (`%%gpus 1`) runs
only on a replica the agent granted it to; the grant is released after the
cell, and a killed replica's lease expires."""

import json
import os
import re
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import KERNEL_BIN
from frontend import stream_text
from replicas import ReplicatedKernel

GPU_CELL = (
    "%%gpus 1\n"
    "import os, time\n"
    "t0 = time.time()\n"
    "granted = os.environ.get('NOTEBOOKOS_GPUS_GRANTED')\n"
    "time.sleep(1.0)\n"
    "t1 = time.time()\n"
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    def __init__(self, tmp, gpus=1):
        self.socket = tmp / "agent.sock"
        self.metrics = f"127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [str(KERNEL_BIN), "agent", "--socket", str(self.socket), "--fake-gpus", str(gpus),
             "--metrics", self.metrics],
        )
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            assert self.proc.poll() is None, "agent exited"
            assert time.monotonic() < deadline, "agent did not start"
            time.sleep(0.05)

    def ask(self, request):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket))
            s.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                assert chunk, "agent closed the connection"
                data += chunk
        return json.loads(data)

    def status(self):
        return self.ask({"op": "status"})["status"]

    def wait_no_grants(self, timeout=10):
        deadline = time.monotonic() + timeout
        while self.status()["grants"]:
            assert time.monotonic() < deadline, self.status()
            time.sleep(0.1)

    def close(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def agent(tmp_path, monkeypatch):
    a = Agent(tmp_path)
    monkeypatch.setenv("NOTEBOOKOS_AGENT_SOCKET", str(a.socket))
    yield a
    a.close()


def interval(k):
    reply, _ = k.fe.execute("pass", silent=True, user_expressions={"v": "(t0, t1, granted)"})
    return eval(reply["user_expressions"]["v"]["data"]["text/plain"])


def test_two_kernels_share_one_gpu_one_cell_at_a_time(agent, tmp_path):
    a = ReplicatedKernel(tmp_path / "a")
    b = ReplicatedKernel(tmp_path / "b")
    try:
        kernels = {a.group()["kernel_id"], b.group()["kernel_id"]}
        spans = []
        for _ in range(3):
            # Both ask for the only GPU at once: one runs, the other waits for it.
            ids = [(k, k.fe.kc.execute(GPU_CELL)) for k in (a, b)]
            for k, msg_id in ids:
                reply = k.fe.shell_reply(msg_id, timeout=60)["content"]
                assert reply["status"] == "ok", reply
                k.fe.iopub_until_idle(msg_id)
                t0, t1, granted = interval(k)
                assert granted == "0"
                spans.append((t0, t1, k.group()["kernel_id"]))
        spans.sort()
        for (s0, e0, k0), (s1, e1, k1) in zip(spans, spans[1:]):
            assert e0 <= s1, f"cells overlapped on the one GPU: {spans}"
        usage = agent.status()["usage"]
        assert set(usage) == kernels
        for k in kernels:
            # Every replica that bid took the GPU for its bid; 3 cells ran on it.
            assert usage[k]["used_gpu_seconds"] >= 3.0, usage
            assert usage[k]["held_gpu_seconds"] >= usage[k]["used_gpu_seconds"], usage
        # CPU cells never ask the agent.
        grants_before = {k: usage[k]["grants"] for k in kernels}
        a.fe.execute("x = 1")
        assert {k: agent.status()["usage"][k]["grants"] for k in kernels} == grants_before
    finally:
        a.close()
        b.close()


def test_a_killed_replicas_grant_expires(agent, tmp_path):
    a = ReplicatedKernel(tmp_path / "a")
    b = ReplicatedKernel(tmp_path / "b")
    try:
        victim = a.peers()[0]
        a.steer(victim)
        msg_id = a.fe.kc.execute("%%gpus 1\nimport time\ntime.sleep(60)")
        a.fe.wait_for(msg_id, "execute_input")
        [grant] = agent.status()["grants"]
        assert grant["replica"] == victim and grant["gpus"] == [0]
        a.kill(victim)
        reply = a.fe.shell_reply(msg_id, timeout=30)["content"]
        assert reply["ename"] == "ReplicaLost", reply
        # Nobody renews the lease: the GPU is free again within it.
        agent.wait_no_grants(timeout=10)
        assert agent.status()["usage"][a.group()["kernel_id"]]["expired"] >= 1
        reply, _ = b.fe.execute(GPU_CELL, timeout=60)
        assert reply["status"] == "ok", reply
    finally:
        a.close()
        b.close()


def test_accounting_in_the_notebook_and_as_prometheus_metrics(agent, tmp_path):
    # No caching: the grant ends with the cell, and its seconds are counted then.
    k = ReplicatedKernel(tmp_path / "k", env={"NOTEBOOKOS_GPU_CACHE_IDLE": "0"})
    try:
        reply, _ = k.fe.execute(GPU_CELL, timeout=60)
        assert reply["status"] == "ok", reply
        agent.wait_no_grants()
        text = k.placement()
        m = re.search(r"GPU-seconds for this kernel: ([\d.]+) held, ([\d.]+) running cells", text)
        assert m, text
        assert float(m[2]) >= 1.0 and float(m[1]) >= float(m[2])
        kernel = k.group()["kernel_id"]
        body = urllib.request.urlopen(f"http://{agent.metrics}/metrics", timeout=10).read().decode()
        assert 'notebookos_gpus{fake="true"} 1' in body, body
        held = re.search(rf'notebookos_gpu_seconds_held_total{{kernel="{kernel}"}} ([\d.e+-]+)', body)
        assert held and float(held[1]) >= 1.0, body
    finally:
        k.close()


def test_the_gpu_stays_with_a_kernel_until_another_needs_it(agent, tmp_path):
    """After a GPU cell the grant is cached: the kernel's next GPU cell reuses
    it (state in place); a second kernel's GPU cell makes the agent revoke it,
    the first kernel moves its state off and releases, and the second runs
    without being told it is queued."""
    a = ReplicatedKernel(tmp_path / "a")
    b = ReplicatedKernel(tmp_path / "b")
    try:
        ka, kb = a.group()["kernel_id"], b.group()["kernel_id"]
        for _ in range(2):
            reply, _ = a.fe.execute(GPU_CELL, timeout=60)
            assert reply["status"] == "ok", reply
        [grant] = agent.status()["grants"]
        assert grant["kernel"] == ka, grant
        assert agent.status()["usage"][ka]["reused"] == 1
        reply, msgs = b.fe.execute(GPU_CELL, timeout=60)
        assert reply["status"] == "ok", reply
        assert "queued" not in stream_text(msgs, "stderr")
        assert interval(b)[2] == "0"
        [grant] = agent.status()["grants"]
        assert grant["kernel"] == kb, grant
        usage = agent.status()["usage"][ka]
        assert usage["revoked"] == 1, usage
        # Two cells of about 1 s ran; the rest of the time the state sat cached.
        assert usage["used_gpu_seconds"] >= 2.0, usage
        assert usage["cached_gpu_seconds"] > 0, usage
        total = usage["used_gpu_seconds"] + usage["cached_gpu_seconds"] + usage["moving_gpu_seconds"]
        assert abs(usage["held_gpu_seconds"] - total) < 0.01, usage
        # And back: a's next GPU cell takes the GPU from b the same way.
        reply, _ = a.fe.execute(GPU_CELL, timeout=60)
        assert reply["status"] == "ok", reply
        assert agent.status()["usage"][kb]["revoked"] == 1
    finally:
        a.close()
        b.close()


def test_bad_requests_to_the_agent_get_errors(agent):
    assert "error" in agent.ask({"op": "format_disk"})
    assert "refused" in agent.ask({"op": "grant", "kernel": "k", "replica": 1, "gpus": 2, "lease_ms": 100})
    assert "error" in agent.ask({"op": "release", "id": 999, "used_ms": 0})
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(agent.socket))
        s.sendall(b"{not json}\n")
        assert b"error" in s.recv(4096)
    assert agent.status()["gpus"][0]["name"] == "fake GPU"
