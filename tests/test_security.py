"""Hostile or careless input, and what the kernel leaves lying around.

Every bad message is dropped with a log line and the kernel keeps serving;
a message over the size limit closes its connection before its body is
read, so memory stays bounded; files are private; nothing listens on all
interfaces; secrets never reach the logs. (Replicas that present no or
another kernel's certificate: raft-transport/tests/cluster.rs.)"""

import json
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import zmq

from conftest import KERNEL_BIN
from replicas import ReplicatedKernel, rss_mib

GIB = 1 << 30


@pytest.fixture
def logged(tmp_path):
    log = tmp_path / "kernel.log"
    with open(log, "w") as f:
        rk = ReplicatedKernel(tmp_path, env={"NOTEBOOKOS_LOG": "info,openraft=off"}, stderr=f)
        try:
            yield rk, log
        finally:
            rk.close()


def _wait_log(log, pattern, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        if re.search(pattern, text):
            return text
        assert time.monotonic() < deadline, f"no log line matching {pattern!r}:\n{text[-3000:]}"
        time.sleep(0.2)


def _dealer(fe):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    info = fe.km.get_connection_info()
    s.connect(f"tcp://{info['ip']}:{info['shell_port']}")
    return s


def test_each_bad_message_is_dropped_with_a_log_line(logged):
    rk, log = logged
    kc = rk.fe.kc
    s = _dealer(rk.fe)
    good = kc.session.msg("execute_request", {"code": "after_bad = 1", "silent": False,
                                               "store_history": True, "user_expressions": {},
                                               "allow_stdin": False})
    frames = kc.session.serialize(good)
    cases = []

    def send(frames, pattern):
        # One at a time, each waiting for a new log line of its own.
        seen = len(re.findall(pattern, log.read_text(errors="replace")))
        s.send_multipart(frames)
        cases.append(pattern)
        _wait_log(log, "(?s)" + "".join(f"{pattern}.*" for _ in range(seen + 1)))

    wrong = list(frames)
    wrong[1] = b"0" * 64
    send(wrong, "signature does not match")
    send([b"<IDS|MSG>", b""] + frames[2:], "has no signature")
    send(frames[:3], "truncated message")
    junk = [b"{not json", b"{}", b"{}", b"{}"]
    send([b"<IDS|MSG>", kc.session.sign(junk)] + junk, "malformed JSON in header")
    header = kc.session.pack(kc.session.msg_header("execute_request"))
    utf = [header.replace(b'"execute_request"', b'"execute_\xffrequest"'), b"{}", b"{}", b"{}"]
    send([b"<IDS|MSG>", kc.session.sign(utf)] + utf, "malformed JSON in header: invalid unicode")
    bomb = [kc.session.pack(kc.session.msg_header("execute_request")), b"{}", b"{}",
            b"[" * 200_000 + b"]" * 200_000]
    send([b"<IDS|MSG>", kc.session.sign(bomb)] + bomb,
         "malformed JSON in content: recursion limit exceeded")
    send(kc.session.serialize(kc.session.msg("no_such_request", {})),
         "unknown message type \"no_such_request\"")
    s.send_multipart(frames)
    reply = json.loads(s.recv_multipart()[-1])
    assert reply["status"] == "ok", reply
    send(frames, "already seen \\(replay\\)")
    assert not s.poll(500), "a bad or replayed message was answered"
    s.close()
    text = log.read_text(errors="replace")
    for pattern in cases:
        assert re.search(pattern, text), (pattern, text[-3000:])
    assert rk.eval("after_bad") == "1"


def test_a_1gib_frame_closes_its_connection_and_memory_stays_bounded(logged):
    rk, log = logged
    pid = rk.pid(rk.front())
    before = rss_mib(pid)
    s = _dealer(rk.fe)
    big = bytearray(GIB)
    s.send(memoryview(big), copy=False)
    _wait_log(log, f"closing a client connection: a message of {GIB} bytes exceeds")
    s.close()
    del big
    assert rk.eval("1 + 1") == "2"
    grew = rss_mib(pid) - before
    assert grew < 128, f"replica 1 grew by {grew:.0f} MiB"


def _descendants(pid):
    children = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _sockets(pids):
    """(proto, local address) of every socket these processes hold:
    listening TCP and all UDP."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if inode in inodes and (proto.startswith("udp") or state == "0A"):
                found.append((proto, local))
    return found


def test_nothing_listens_on_all_interfaces(tmp_path):
    agent_sock = tmp_path / "agent.sock"
    agent = subprocess.Popen([str(KERNEL_BIN), "agent", "--fake-gpus", "1",
                              "--socket", str(agent_sock), "--metrics", "127.0.0.1:0"])
    rk = ReplicatedKernel(tmp_path / "k", env={"NOTEBOOKOS_AGENT_SOCKET": str(agent_sock)})
    try:
        reply, _ = rk.fe.execute("%%gpus 1\nx = 1")
        assert reply["status"] == "ok", reply
        pids = _descendants(rk.fe.km.provisioner.process.pid) + [agent.pid]
        socks = _sockets(pids)
        # Jupyter's 5 channels, 3 replicas' QUIC endpoints, the agent's metrics.
        assert len(socks) >= 9, socks
        everywhere = [(p, a) for p, a in socks
                      if a.split(":")[0] in ("00000000", "00000000000000000000000000000000")]
        assert not everywhere, f"listening on all interfaces: {everywhere} of {socks}"
        # Files: the agent's socket, the group state, the connection file.
        assert stat.S_IMODE(agent_sock.stat().st_mode) == 0o600
        for p in [rk.state, *rk.state.rglob("*")]:
            want = 0o700 if p.is_dir() else 0o600
            assert stat.S_IMODE(p.stat().st_mode) == want, p
        conn = Path(rk.fe.km.connection_file)
        assert stat.S_IMODE(conn.stat().st_mode) == 0o600
    finally:
        rk.close()
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)


def test_only_the_connection_file_ports_take_tcp(tmp_path):
    """The zmq sockets behind the size guards are unix sockets in a private
    directory: over TCP the kernel's processes listen on the connection
    file's five ports and nothing else, so no client can bypass a guard."""
    rk = ReplicatedKernel(tmp_path / "k")
    try:
        reply, _ = rk.fe.execute("x = 1")
        assert reply["status"] == "ok", reply
        socks = _sockets(_descendants(rk.fe.km.provisioner.process.pid))
        tcp = sorted(int(a.split(":")[1], 16) for p, a in socks if p.startswith("tcp"))
        info = json.loads(Path(rk.fe.km.connection_file).read_text())
        want = sorted(info[f"{c}_port"] for c in ("shell", "iopub", "stdin", "control", "hb"))
        assert tcp == want, f"listening on TCP {tcp}, the connection file names {want}"
    finally:
        rk.close()


def test_secrets_never_reach_the_logs(tmp_path):
    log = tmp_path / "kernel.log"
    with open(log, "w") as f:
        rk = ReplicatedKernel(tmp_path, env={"NOTEBOOKOS_LOG": "debug,openraft=debug"}, stderr=f)
        try:
            assert rk.fe.execute("secret_test = 1")[0]["status"] == "ok"
            # A peer dies and is replaced: the noisiest path, with a new identity.
            rk.kill(rk.peers()[0])
            rk.wait_members(3)
            assert rk.fe.execute("1/0")[0]["status"] == "error"
            rk.verify()
            key = rk.fe.km.session.key.decode()
            ca_pem = rk.group()["ca_pem"]
        finally:
            rk.close()
    text = log.read_text(errors="replace")
    assert len(text) > 1000, "debug logging produced almost nothing"
    assert key and key not in text
    assert "PRIVATE KEY" not in text
    body = "".join(l for l in ca_pem.splitlines() if l and not l.startswith("-----"))
    assert body[:64] not in text
