"""A replicated kernel under test: a front-end plus control over which
replica may run the next cell, the replicas' pids, and namespace checks."""

import json
import os
import re
import signal
import time
from pathlib import Path

from frontend import Frontend, stream_text

VERIFY_OK = re.compile(r"^all (\d+) replicas hold the same namespace")


class ReplicatedKernel:
    """notebookos with 3 replicas, its group state in ``tmp``.

    ``steer(r)`` makes every replica but ``r`` yield (a control message that
    stands in for "no free GPU on that host"), so the next cell runs on ``r``.
    """

    def __init__(self, tmp, kernel_name="notebookos", replicas=3, env=None, **frontend):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.state = self.tmp / "state"
        env = {
            **os.environ,
            "NOTEBOOKOS_STATE_DIR": str(self.state),
            "NOTEBOOKOS_REPLICAS": str(replicas),
            **(env or {}),
        }
        self.fe = Frontend(kernel_name=kernel_name, env=env, **frontend)
        self.seen_pids = set()
        self.wait_members(replicas)

    def close(self):
        self.fe.close()

    def group(self):
        """The group state replica 1 keeps for its connection file."""
        files = list(self.state.glob("*/group.json"))
        assert len(files) == 1, files
        g = json.loads(files[0].read_text())
        self.seen_pids.update(m["pid"] for m in g["members"])
        return g

    def pid(self, replica):
        return {m["id"]: m["pid"] for m in self.group()["members"]}[replica]

    def peers(self):
        g = self.group()
        return [m["id"] for m in g["members"] if m["id"] != g["front"]]

    def front(self):
        return self.group()["front"]

    def steer(self, replica):
        ids = {m["id"] for m in self.group()["members"]}
        self.fe.steer(ids - {replica})

    def yield_all(self):
        self.fe.steer({m["id"] for m in self.group()["members"]})

    def unsteer(self):
        self.fe.steer(())

    def kill(self, replica):
        """SIGKILL, once every earlier cell's changes are on every replica:
        a replica killed between cells then takes nothing with it (see
        ``kill_now`` for one killed while changes stream)."""
        self.fe.synced()
        self.kill_now(replica)

    def kill_now(self, replica):
        os.kill(self.pid(replica), signal.SIGKILL)

    def kill_front_and_restart(self):
        """Replica 1 dies; Jupyter's restart brings a new one, which rejoins
        the survivors. The next cell is steered to a peer meanwhile."""
        self.steer(self.peers()[0])
        self.kill(self.front())
        deadline = time.monotonic() + 20
        while self.fe.km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.fe.km.restart_kernel(now=True)
        self.fe.kc.wait_for_ready(timeout=120)
        self.fe.flush_iopub()
        self.unsteer()

    def placement(self):
        reply, msgs = self.fe.execute("%notebookos", silent=True)
        assert reply["status"] == "ok", reply
        return stream_text(msgs)

    def wait_members(self, n, timeout=90):
        """Until the group is n live replicas, all voters: dead ones removed,
        replacements caught up."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.placement()
            voters = {int(v) for v in re.findall(r"replica (\d+): .*\bvoter\b", text)}
            members = {m["id"]: m["pid"] for m in self.group()["members"]}
            live = {i for i, pid in members.items() if alive(pid)}
            if len(voters) == n and voters == live == set(members) and "catching up" not in text:
                return text
            assert time.monotonic() < deadline, (text, members)
            time.sleep(0.5)

    def verify(self, replicas=3):
        """Every replica's namespace digest is the same."""
        reply, msgs = self.fe.execute("%notebookos verify", silent=True, timeout=90)
        assert reply["status"] == "ok", reply
        text = stream_text(msgs)
        m = VERIFY_OK.match(text)
        assert m and int(m[1]) == replicas, text
        return text

    def eval(self, expr):
        """The repr of an expression, from a silent cell (no execution count used)."""
        reply, _ = self.fe.execute("pass", silent=True, user_expressions={"v": expr})
        v = reply["user_expressions"]["v"]
        assert v["status"] == "ok", v
        return v["data"]["text/plain"]

    def pid_of_next_cell(self):
        """The pid of the process that runs a cell now."""
        reply, msgs = self.fe.execute("import os as _os; print(_os.getpid())", silent=True)
        assert reply["status"] == "ok", reply
        return int(stream_text(msgs))


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def outputs(reply, msgs):
    """What a user sees of a cell, comparable across kernels."""
    seen = []
    for m in msgs:
        t, c = m["msg_type"], m["content"]
        if t == "stream":
            if seen and seen[-1][0] == c["name"]:
                seen[-1] = (c["name"], seen[-1][1] + c["text"])
            else:
                seen.append((c["name"], c["text"]))
        elif t in ("execute_result", "display_data"):
            seen.append((t, c["data"].get("text/plain")))
        elif t == "error":
            seen.append(("error", c["ename"], c["evalue"]))
    status = (reply["status"], reply.get("execution_count"), reply.get("ename"))
    return status, seen
