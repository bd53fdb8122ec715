"""A dummy front-end for the integration tests: jupyter_client plus helpers
that collect everything a request caused on iopub."""

import time
from queue import Empty

from jupyter_client.manager import start_new_kernel

TIMEOUT = 30


class Frontend:
    def __init__(self, kernel_name="notebookos", **kwargs):
        self.km, self.kc = start_new_kernel(kernel_name=kernel_name, startup_timeout=60, **kwargs)

    def close(self):
        self.kc.stop_channels()
        if self.km.is_alive():
            self.km.shutdown_kernel(now=False)

    def iopub_until_idle(self, msg_id, timeout=TIMEOUT):
        """iopub messages whose parent is msg_id, up to and including idle."""
        msgs = []
        deadline = time.monotonic() + timeout
        while True:
            m = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            msgs.append(m)
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                return msgs

    def wait_for(self, msg_id, msg_type, timeout=TIMEOUT):
        """The first iopub message of msg_type whose parent is msg_id."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == msg_type:
                return m

    def shell_reply(self, msg_id, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            m = self.kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
            if m["parent_header"].get("msg_id") == msg_id:
                return m

    def execute(self, code, timeout=TIMEOUT, **kwargs):
        """Runs a cell; returns (reply content, iopub messages)."""
        msg_id = self.kc.execute(code, **kwargs)
        reply = self.shell_reply(msg_id, timeout)
        msgs = self.iopub_until_idle(msg_id, timeout)
        return reply["content"], msgs

    def eval(self, expr):
        """The repr of an expression evaluated in the kernel."""
        reply, _ = self.execute("pass", user_expressions={"v": expr})
        v = reply["user_expressions"]["v"]
        assert v["status"] == "ok", v
        return v["data"]["text/plain"]

    def steer(self, yielding, timeout=TIMEOUT):
        """From the next cell on, the replicas in ``yielding`` yield every cell,
        as if their host had no free GPU (notebookos' ``notebookos_steer_request``
        on control, committed through the replicas' log before it is answered)."""
        self.control("notebookos_steer_request", {"yield": sorted(yielding)}, timeout)

    def synced(self, timeout=TIMEOUT):
        """Returns once every replica has every earlier cell's changes
        (``notebookos_sync_request``; cells reply before they are replicated)."""
        self.control("notebookos_sync_request", {"timeout": timeout}, timeout + 5)

    def control(self, msg_type, content, timeout=TIMEOUT):
        """Sends a control request; returns its reply's content, which must be ok."""
        msg = self.kc.session.msg(msg_type, content)
        self.kc.control_channel.send(msg)
        deadline = time.monotonic() + timeout
        while True:
            m = self.kc.control_channel.get_msg(timeout=max(0.1, deadline - time.monotonic()))
            if m["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                assert m["content"]["status"] == "ok", m["content"]
                return m["content"]

    def flush_iopub(self):
        while True:
            try:
                self.kc.get_iopub_msg(timeout=0.2)
            except Empty:
                return


def stream_text(msgs, name="stdout"):
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == name)


def of_type(msgs, msg_type):
    return [m for m in msgs if m["msg_type"] == msg_type]


AWAIT_A_COMM_ANSWER = """\
import asyncio, comm
answer = asyncio.get_running_loop().create_future()
c = comm.create_comm(target_name='await-test')
c.on_msg(lambda msg: answer.set_result(msg['content']['data']['value']))
print('got', await asyncio.wait_for(answer, 20))
"""


def await_a_comm_answer(fe):
    """A cell awaits a widget's answer while the next cell is already queued:
    the comm message is served inside the waiting cell (as ipykernel does),
    not after the cells queued behind it."""
    first = fe.kc.execute(AWAIT_A_COMM_ANSWER)
    comm_id = fe.wait_for(first, "comm_open")["content"]["comm_id"]
    second = fe.kc.execute("print(answer.result())\nc.close()\ndel c, answer")
    fe.kc.shell_channel.send(fe.kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {"value": 42}}))
    assert fe.shell_reply(first)["content"]["status"] == "ok"
    assert stream_text(fe.iopub_until_idle(first)) == "got 42\n"
    assert fe.shell_reply(second)["content"]["status"] == "ok"
    assert stream_text(fe.iopub_until_idle(second)) == "42\n"
