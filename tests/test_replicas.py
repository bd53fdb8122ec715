"""The replicated kernel: three replicas, every cell through Raft, the winner
streams its output to replica 1, namespace changes reach every replica, and
replicas that die are replaced without losing state.

Which replica runs a cell is steered with a control message (the replicas
it lists yield, as if their host had no free GPU), so each test knows
where its cells run."""

import ast
import base64
import os
import random
import time
from pathlib import Path
from queue import Empty

import pytest

from frontend import Frontend, await_a_comm_answer, of_type, stream_text
from notebook50 import CELLS
from replicas import ReplicatedKernel, alive, outputs


@pytest.fixture
def rk(tmp_path):
    k = ReplicatedKernel(tmp_path)
    yield k
    k.close()


@pytest.fixture(scope="module")
def ipykernel_outputs():
    """The 50 cells' outputs on ipykernel, the reference."""
    fe = Frontend(kernel_name="python3")
    try:
        return [outputs(*fe.execute(c)) for c in CELLS]
    finally:
        fe.close()


def test_fifty_cells_match_ipykernel_and_all_replicas_agree_after_each(rk, ipykernel_outputs):
    ids = [rk.front(), *rk.peers()]
    ran_on = set()
    for i, cell in enumerate(CELLS):
        target = ids[i % 3]
        rk.steer(target)
        if i < 3:
            assert rk.pid_of_next_cell() == rk.pid(target)
            ran_on.add(target)
        got = outputs(*rk.fe.execute(cell))
        assert got == ipykernel_outputs[i], f"cell {i} on replica {target}:\n{cell}"
        rk.verify()
    assert ran_on == set(ids)


def test_a_peers_last_output_comes_before_the_idle(rk):
    """A cell on a peer ends with a burst of large outputs: every one reaches
    the front-end before the cell's reply and idle, as with ipykernel, though
    the output travels by mail and the cell's end through the log (the front
    signs and sends each one while the log commits the end)."""
    rk.steer(rk.peers()[0])
    code = "for i in range(24):\n    display({'text/plain': str(i) + 'x' * (2 << 20)}, raw=True)"
    for _ in range(3):
        msg_id = rk.fe.kc.execute(code)
        msgs = rk.fe.iopub_until_idle(msg_id)
        shown = [m["content"]["data"]["text/plain"][:2].rstrip("x") for m in of_type(msgs, "display_data")]
        assert shown == [str(i) for i in range(24)]


def test_kill_each_replica_in_turn_loses_nothing(rk, ipykernel_outputs):
    """What the user sees: a peer killed between cells is invisible; the
    replica running a cell killed mid-cell ends that cell with the error
    "ReplicaLost: replica N was lost while executing; the namespace is as
    before this cell" and the next cell runs elsewhere; replica 1 killed
    between cells is restarted by Jupyter and the namespace is all there."""
    rng = random.Random(int(os.environ.get("NOTEBOOKOS_TEST_SEED", "4")))
    peer_kill, running_kill, front_kill = sorted(rng.sample(range(5, 45), 3))
    for i, cell in enumerate(CELLS):
        if i == peer_kill:
            victim = rk.peers()[0]
            rk.steer(rk.front())
            rk.kill(victim)
            # The next cell runs at once; the replacement catches up meanwhile.
        if i == running_kill:
            # Raft needs a majority: the replacement for the last victim must
            # have caught up before the next replica dies.
            rk.wait_members(3)
            victim = rk.peers()[-1]
            rk.steer(victim)
            msg_id = rk.fe.kc.execute("import time\nlost_marker = 1\ntime.sleep(60)")
            rk.fe.wait_for(msg_id, "execute_input")
            time.sleep(0.5)
            rk.kill(victim)
            reply = rk.fe.shell_reply(msg_id, timeout=30)["content"]
            assert reply["status"] == "error" and reply["ename"] == "ReplicaLost", reply
            assert reply["evalue"] == (
                f"replica {victim} was lost while executing; the namespace is as before this cell"
            )
            [err] = of_type(rk.fe.iopub_until_idle(msg_id), "error")
            assert err["content"]["ename"] == "ReplicaLost"
            rk.unsteer()
            assert rk.eval("'lost_marker' in globals()") == "False"
        if i == front_kill:
            rk.wait_members(3)
            rk.kill_front_and_restart()
        got = outputs(*rk.fe.execute(cell, timeout=90))
        assert got == ipykernel_outputs[i], f"cell {i} (kills at {peer_kill}, {running_kill}, {front_kill})"
    rk.wait_members(3)
    rk.verify()


def test_replicas_that_cannot_start_are_told_under_the_first_cell(tmp_path):
    """Asked for replicas it cannot start, the kernel still runs cells, alone,
    and says so once, under the first cell: not only in a log."""
    env = {**os.environ, "NOTEBOOKOS_STATE_DIR": str(tmp_path / "state"),
           "NOTEBOOKOS_REPLICAS": "3", "NOTEBOOKOS_REPLICA_IP": "not an address"}
    fe = Frontend(kernel_name="notebookos", env=env)
    try:
        # A front-end's own silent cell (nobody sees its output) does not use it up.
        reply, msgs = fe.execute("pass", silent=True)
        assert reply["status"] == "ok" and stream_text(msgs, "stderr") == ""
        reply, msgs = fe.execute("x = 41\nx + 1")
        assert reply["status"] == "ok" and reply["execution_count"] == 1, reply
        told = stream_text(msgs, "stderr")
        assert "replicas could not start" in told and "runs as a single replica" in told, told
        reply, msgs = fe.execute("x + 2")
        assert reply["status"] == "ok" and stream_text(msgs, "stderr") == ""
    finally:
        fe.close()


def test_notebookos_magic_lists_the_group(rk):
    text = rk.placement()
    assert text.startswith("notebookos: 3 replicas"), text
    g = rk.group()
    for m in g["members"]:
        role = "talks to Jupyter" if m["id"] == g["front"] else "peer"
        assert f"replica {m['id']}: {role}" in text and f"pid {m['pid']}" in text, text


def test_shutdown_leaves_no_replicas_or_state(tmp_path):
    rk = ReplicatedKernel(tmp_path)
    rk.fe.execute("x = 1")
    pids = set(rk.seen_pids) | {m["pid"] for m in rk.group()["members"]}
    assert len(pids) == 3
    rk.close()
    deadline = time.monotonic() + 10
    running = pids
    while running and time.monotonic() < deadline:
        running = {p for p in pids if alive(p)}
        time.sleep(0.1)
    assert not running
    assert not any(rk.state.iterdir()), list(rk.state.iterdir())


def test_user_restart_clears_every_replica(rk):
    old = set(rk.seen_pids) | {m["pid"] for m in rk.group()["members"]}
    rk.fe.execute("before_restart = 1")
    rk.fe.km.restart_kernel(now=False)
    rk.fe.kc.wait_for_ready(timeout=90)
    rk.wait_members(3)
    new = {m["pid"] for m in rk.group()["members"]}
    assert not (old & new)
    for target in [rk.front(), *rk.peers()]:
        rk.steer(target)
        reply, _ = rk.fe.execute("before_restart")
        assert reply["ename"] == "NameError"
    rk.verify()


def test_all_replicas_busy_queues_the_cell(rk):
    rk.yield_all()
    msg_id = rk.fe.kc.execute("queued = 1")
    notice = rk.fe.wait_for(msg_id, "stream", timeout=10)
    assert notice["content"]["name"] == "stderr"
    assert "queued" in notice["content"]["text"]
    time.sleep(0.5)
    rk.unsteer()
    assert rk.fe.shell_reply(msg_id, timeout=10)["content"]["status"] == "ok"
    rk.fe.iopub_until_idle(msg_id)
    rk.verify()


def test_unpicklable_values_are_listed_by_the_magic_not_printed_in_the_cell(rk):
    reply, msgs = rk.fe.execute("fh = open(os.devnull) if 'os' in dir() else open('/dev/null')\nok = 1")
    assert reply["status"] == "ok"
    assert stream_text(msgs, "stderr") == ""
    rk.steer(rk.peers()[0])
    assert rk.fe.eval("ok") == "1"
    # A peer ran that cell: the front, which renders the magic, learnt of fh from its delta.
    rk.unsteer()
    _, msgs = rk.fe.execute("%notebookos")
    out = stream_text(msgs, "stdout")
    assert "Not replicated" in out and "fh (open file)" in out, out


def test_the_shell_travels_as_each_replicas_own(rk):
    """`ip = get_ipython()` (and objects holding the shell or sys.stdout) is
    bound to the receiving replica's own shell: no output, nothing listed as
    lost, and the peer's `ip` is its shell, with ipykernel's parent_header."""
    code = ("ip = get_ipython()\n"
            "class Holder:\n"
            "    def __init__(self):\n"
            "        self.shell, self.out = get_ipython(), __import__('sys').stdout\n"
            "held = Holder()")
    reply, msgs = rk.fe.execute(code)
    assert reply["status"] == "ok"
    assert [m for m in msgs if m["msg_type"] == "stream"] == []
    rk.steer(rk.peers()[0])
    assert rk.pid_of_next_cell() == rk.pid(rk.peers()[0])
    reply, msgs = rk.fe.execute(
        "import os, sys\n"
        "print(ip is get_ipython(), held.shell is ip, held.out is sys.stdout,\n"
        "      ip.parent_header['msg_type'], ip.kernel.parent_header['msg_id'] == ip.parent_header['msg_id'],\n"
        "      os.getpid())")
    assert reply["status"] == "ok", reply
    assert stream_text(msgs, "stderr") == ""
    words = stream_text(msgs, "stdout").split()
    assert words[:5] == ["True", "True", "True", "execute_request", "True"], words
    assert int(words[5]) == rk.pid(rk.peers()[0])
    rk.unsteer()
    _, msgs = rk.fe.execute("%notebookos")
    assert "Not replicated" not in stream_text(msgs, "stdout")
    rk.verify()


def test_warnings_of_the_replication_stay_out_of_cells(rk):
    """A warning raised while the kernel captures a cell's changes (here by a
    value's own pickling, as torch's .grad warning did on a GPU) goes to the
    kernel's log, not into that cell or the next."""
    code = ("import warnings\n"
            "class Noisy:\n"
            "    def __reduce__(self):\n"
            "        warnings.warn('pickled by the replication')\n"
            "        return (Noisy, ())\n"
            "noisy = Noisy()")
    rk.fe.flush_iopub()
    late = []
    for cell in (code, "noisy2 = noisy"):
        reply, msgs = rk.fe.execute(cell)
        assert reply["status"] == "ok"
        late += msgs
        rk.fe.synced()
    # Whatever arrived, under either cell, before or after its idle.
    while True:
        try:
            late.append(rk.fe.kc.get_iopub_msg(timeout=1))
        except Empty:
            break
    streams = [m["content"] for m in late if m["msg_type"] == "stream"]
    assert streams == [], streams


def test_configuration_and_process_state_are_the_same_on_every_replica(tmp_path):
    """The kernel's command-line configuration, and what cells change of the
    working directory, environment and sys.path, hold on whichever replica
    runs the next cell -- a peer, and a replacement started from a checkpoint."""
    from conftest import write_spec

    hist = tmp_path / "hist.sqlite"
    write_spec("nbos-config", "config", extra_args=[
        f"--HistoryManager.hist_file={hist}", "--InteractiveShell.ast_node_interactivity=all"])
    (tmp_path / "work" / "deeper").mkdir(parents=True)
    rk = ReplicatedKernel(tmp_path / "k", kernel_name="nbos-config", env={"NBOS_DROPPED": "x"})
    try:
        reply, _ = rk.fe.execute(
            "import os, sys\n"
            f"%cd {tmp_path / 'work'}\n"
            "%env NBOS_MAGIC=from-magic\n"
            "os.environ['NBOS_SET'] = 'from-os'\n"
            "del os.environ['NBOS_DROPPED']\n"
            "sys.path.insert(0, '/nbos/extra')")
        assert reply["status"] == "ok", reply
        probe = ("os.getcwd(), os.environ.get('NBOS_MAGIC'), os.environ.get('NBOS_SET'), "
                 "'NBOS_DROPPED' in os.environ, sys.path[0], "
                 "str(get_ipython().history_manager.hist_file)")
        expected = (str(tmp_path / "work"), "from-magic", "from-os", False, "/nbos/extra",
                    str(hist))

        def on(replica):
            rk.fe.synced()
            rk.steer(replica)
            assert rk.pid_of_next_cell() == rk.pid(replica)
            reply, msgs = rk.fe.execute("1\n2")
            assert [m["content"]["data"]["text/plain"]
                    for m in of_type(msgs, "execute_result")] == ["1", "2"]
            return ast.literal_eval(rk.eval(probe))

        peer, other = rk.peers()
        assert on(peer) == expected
        # The peer's own change comes back to replica 1.
        rk.fe.execute("os.chdir('deeper'); os.environ['NBOS_SET'] = 'from-peer'")
        deeper = on(rk.front())
        assert deeper == (str(tmp_path / "work" / "deeper"), "from-magic", "from-peer", False,
                          "/nbos/extra", str(hist))
        rk.kill(other)
        rk.wait_members(3)
        (newcomer,) = set(rk.peers()) - {peer}
        assert on(newcomer) == deeper
    finally:
        rk.close()


# -- the single-replica behaviours, with the cell on another replica -----------

@pytest.fixture
def on_peer(rk):
    rk.steer(rk.peers()[0])
    assert rk.pid_of_next_cell() == rk.pid(rk.peers()[0])
    return rk


def test_remote_output_order_and_streaming(on_peer):
    reply, msgs = on_peer.fe.execute(
        "import sys\nprint('a')\nprint('b', file=sys.stderr)\nprint('c')\n7 * 6"
    )
    kinds = [(m["msg_type"], m["content"].get("name")) for m in msgs]
    assert kinds == [
        ("status", None), ("execute_input", None), ("stream", "stdout"), ("stream", "stderr"),
        ("stream", "stdout"), ("execute_result", None), ("status", None),
    ], kinds
    assert all(m["header"]["session"] == msgs[0]["header"]["session"] for m in msgs)


def test_remote_asyncio_task_prints_between_cells(on_peer):
    """A task lives on the replica whose cell scheduled it; what it prints
    while that replica is idle reaches the notebook, in its cell."""
    fe = on_peer.fe
    first = fe.kc.execute(
        "import asyncio\n"
        "async def later():\n"
        "    await asyncio.sleep(0.2)\n"
        "    print('from the task', flush=True)\n"
        "asyncio.get_event_loop().create_task(later())\n"
        "del later"
    )
    assert fe.shell_reply(first)["content"]["status"] == "ok"
    m = fe.wait_for(first, "stream")
    assert m["content"]["text"] == "from the task\n"


def test_remote_cell_awaits_a_comm_answer(on_peer):
    await_a_comm_answer(on_peer.fe)


def test_remote_input_round_trip(on_peer):
    fe = on_peer.fe
    msg_id = fe.kc.execute("name = input('who? ')", allow_stdin=True)
    req = fe.kc.get_stdin_msg(timeout=10)
    assert req["content"] == {"prompt": "who? ", "password": False}
    assert req["parent_header"]["msg_id"] == msg_id
    fe.kc.input("Ada")
    assert fe.shell_reply(msg_id)["content"]["status"] == "ok"
    fe.iopub_until_idle(msg_id)
    on_peer.steer(on_peer.front())
    assert fe.eval("name") == "'Ada'"


@pytest.mark.parametrize("kernel_name", ["notebookos", "notebookos-signal"])
def test_remote_interrupt(tmp_path, kernel_name):
    rk = ReplicatedKernel(tmp_path, kernel_name=kernel_name)
    try:
        rk.steer(rk.peers()[0])
        fe = rk.fe
        msg_id = fe.kc.execute("import time; time.sleep(60)")
        fe.wait_for(msg_id, "execute_input", timeout=10)
        time.sleep(0.3)
        fe.km.interrupt_kernel()
        reply = fe.shell_reply(msg_id, timeout=10)["content"]
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
        fe.iopub_until_idle(msg_id)
        assert rk.pid_of_next_cell() == rk.pid(rk.peers()[0])
        assert fe.eval("'alive'") == "'alive'"
    finally:
        rk.close()


def test_remote_matplotlib_and_widget(on_peer):
    fe = on_peer.fe
    reply, msgs = fe.execute("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    [d] = [m for m in of_type(msgs, "display_data") if "image/png" in m["content"]["data"]]
    assert base64.b64decode(d["content"]["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    comm_id = slider_made(fe)
    # The front-end moves the slider: the message goes to the replica that owns the widget.
    move(fe, comm_id, 7)
    # The next cell sees it, as with ipykernel: no waiting for the update's idle.
    assert fe.eval("s.value") == "7"


def slider_made(fe, also=""):
    """Runs a cell that makes the slider `s` (and runs `also`); returns its comm id."""
    reply, msgs = fe.execute(f"import ipywidgets as w\ns = w.IntSlider(value=3)\n{also}s")
    assert reply["status"] == "ok", reply
    [comm_id] = [m["content"]["comm_id"] for m in of_type(msgs, "comm_open")
                 if m["content"]["data"]["state"].get("_model_name") == "IntSliderModel"]
    return comm_id


def move(fe, comm_id, value):
    """The front-end moves a slider; returns the message it sent."""
    update = fe.kc.session.msg(
        "comm_msg",
        {"comm_id": comm_id, "data": {"method": "update", "state": {"value": value},
                                      "buffer_paths": []}},
    )
    fe.kc.shell_channel.send(update)
    return update


def moved(fe, comm_id, value):
    """The front-end moves a slider; returns what the front-end hears back."""
    return fe.iopub_until_idle(move(fe, comm_id, value)["header"]["msg_id"])


def test_a_widget_works_from_every_replica(rk):
    """A widget made on one replica: the front-end's updates reach the
    replica holding its comm in order with the cells, every replica's next
    cell sees them, and a cell anywhere that sets the value tells the
    front-end and leaves the name bound to the widget the front-end talks to."""
    fe = rk.fe
    owner, other = rk.peers()
    rk.steer(owner)
    comm_id = slider_made(fe)
    for value, where in enumerate([owner, rk.front(), other, owner, other, rk.front()], start=10):
        echoed = of_type(moved(fe, comm_id, value), "comm_msg")
        assert [m["content"]["data"]["state"]["value"] for m in echoed] == [value]
        rk.steer(where)
        assert fe.eval("(s.value, __import__('os').getpid())") == f"({value}, {rk.pid(where)})"
    # A cell elsewhere sets it: the front-end hears it from that replica.
    rk.steer(other)
    _, msgs = fe.execute("s.value = 2")
    [update] = of_type(msgs, "comm_msg")
    assert update["content"]["comm_id"] == comm_id
    assert update["content"]["data"]["state"] == {"value": 2}
    # The owner's name still holds the live widget: the front-end's next move reaches it.
    moved(fe, comm_id, 5)
    rk.steer(owner)
    assert fe.eval("s.value") == "5"
    assert fe.eval("s is w.widgets.widget._instances[s.model_id]") == "True"
    fe.execute("pass")
    # No replica's copy closed the front-end's side on the way.
    fe.flush_iopub()
    rk.unsteer()
    _, msgs = fe.execute("s.value")
    assert not of_type(msgs, "comm_close")
    rk.verify()


def test_a_widget_outlives_the_replica_that_made_it(rk):
    """The replica holding a widget's comm dies: the front-end's next move is
    served by replica 1's copy instead of being lost, and nothing hangs."""
    fe = rk.fe
    owner = rk.peers()[0]
    rk.steer(owner)
    comm_id = slider_made(fe)
    rk.unsteer()
    rk.kill(owner)
    rk.wait_members(3)
    echoed = of_type(moved(fe, comm_id, 6), "comm_msg")
    assert [m["content"]["data"]["state"]["value"] for m in echoed] == [6]
    assert fe.eval("s.value") == "6"


def test_a_widgets_callbacks_fire_once_where_its_change_is_made(rk):
    """A callback attached by a cell on another replica than the widget's
    fires for the front-end's moves (on the widget's replica) and for a
    cell's change on any replica, once each time, as with ipykernel."""
    fe = rk.fe
    owner, other = rk.peers()
    rk.steer(owner)
    comm_id = slider_made(fe, also="b = w.Button()\n")
    rk.steer(other)
    fe.execute("seen = []\n"
               "s.observe(lambda ch: print('moved to', ch['new']), 'value')\n"
               "b.on_click(lambda _: seen.append('click'))")
    assert stream_text(moved(fe, comm_id, 9)) == "moved to 9\n"
    rk.steer(rk.front())
    _, msgs = fe.execute("s.value = 4")
    assert stream_text(msgs) == "moved to 4\n"
    # A click, handled on the button's replica, changes the namespace everywhere.
    rk.steer(other)
    button_id = fe.eval("b.model_id").strip("'")
    click = fe.kc.session.msg("comm_msg", {"comm_id": button_id,
                                           "data": {"method": "custom", "content": {"event": "click"}}})
    fe.kc.shell_channel.send(click)
    assert fe.eval("seen") == "['click']"
    rk.verify()


# -- replication after the reply -----------------------------------------------

def slow_to_replicate(seconds):
    """A cell whose changes take `seconds` to capture (pickling `slow` sleeps)."""
    return f"""
class SlowToPickle:
    def __reduce__(self):
        import time
        time.sleep({seconds})
        return (int, ())

lost_marker = 1
slow = SlowToPickle()
"""


def test_changes_lost_with_their_only_holder_are_reported_by_cell(rk):
    """The reply does not wait for replication. If the replica holding a
    cell's changes dies before they reach another, the next cell says which
    cells' changes are lost and what the namespace is; re-running them
    restores it."""
    rk.fe.execute("kept = 41")
    victim = rk.peers()[0]
    rk.steer(victim)
    # Its changes cannot leave the victim: pickling `slow` blocks there.
    reply, _ = rk.fe.execute(slow_to_replicate(120))
    assert reply["status"] == "ok" and reply["execution_count"] == 2, reply
    rk.kill_now(victim)
    rk.unsteer()
    reply, msgs = rk.fe.execute("kept + 1")
    notice = stream_text(msgs, "stderr")
    assert f"replica {victim} was lost before the changes of In [2] reached another" in notice
    assert "the namespace is as it was after In [1]" in notice, notice
    assert [m["content"]["data"]["text/plain"] for m in of_type(msgs, "execute_result")] == ["42"]
    assert rk.eval("'lost_marker' in globals()") == "False"
    # Told once.
    _, msgs = rk.fe.execute("pass")
    assert stream_text(msgs, "stderr") == ""
    rk.fe.execute("lost_marker = 1")
    assert rk.eval("lost_marker + kept") == "42"
    rk.wait_members(3)
    rk.verify()


def test_the_replica_holding_the_newest_changes_keeps_the_lead(rk):
    victim = rk.peers()[0]
    rk.steer(victim)
    rk.fe.execute(slow_to_replicate(2))
    rk.unsteer()
    # Replica 1 would lead the next cell, but only the victim has the changes yet.
    assert rk.pid_of_next_cell() == rk.pid(victim)
    rk.fe.synced()
    _, msgs = rk.fe.execute("%notebookos")
    out = stream_text(msgs, "stdout")
    assert "Replication: in the background, after each reply; every replica has" in out, out
    rk.verify()


def test_strict_mode_replies_after_the_changes_are_replicated(tmp_path):
    rk = ReplicatedKernel(tmp_path, env={"NOTEBOOKOS_SYNC": "strict"})
    try:
        victim = rk.peers()[0]
        rk.steer(victim)
        reply, _ = rk.fe.execute("durable = 7")
        assert reply["status"] == "ok"
        rk.kill_now(victim)
        rk.unsteer()
        reply, msgs = rk.fe.execute("durable")
        assert stream_text(msgs, "stderr") == ""
        assert [m["content"]["data"]["text/plain"] for m in of_type(msgs, "execute_result")] == ["7"]
        _, msgs = rk.fe.execute("%notebookos")
        assert "Replication: strict" in stream_text(msgs, "stdout")
    finally:
        rk.close()


def on_shared_pages(pid):
    """The deltas whose pages some memory of the process is, mapped copy-on-write
    (the maker's own mapping of a delta it still ships is read-only)."""
    return {line.split()[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if "/memfd:notebookos-blob-" in line and line.split()[1] == "rw-p"}


@pytest.fixture
def sharing(tmp_path):
    k = ReplicatedKernel(tmp_path, env={"NOTEBOOKOS_SHARE_PAGES": "always"})
    yield k
    k.close()


def test_large_changes_are_one_shared_copy_on_this_host(sharing, tmp_path):
    """A large delta is made once, in a sealed memory file that each peer maps
    copy-on-write instead of receiving a copy over QUIC; a peer that writes to
    its array changes its own pages only. With NOTEBOOKOS_SHARE_PAGES=always
    the replica that made it gives up its own copy for those pages too."""
    rk = sharing
    rk.fe.execute("import numpy as np\nbig = np.arange(4_000_000, dtype=np.float64)")
    rk.fe.synced()
    rk.verify()  # every replica applied it, and read every page
    for r in rk.peers():
        assert on_shared_pages(rk.pid(r)), f"replica {r} holds a copy of its own"
    # The replica that ran the cell swapped its own copy for the shared pages too.
    assert on_shared_pages(rk.pid(rk.front())), "the maker keeps a copy of its own"
    writer = rk.peers()[0]
    rk.steer(writer)
    rk.fe.execute("big[:10] += 1")
    rk.unsteer()
    rk.fe.synced()
    assert rk.eval("float(big[:11].sum())") == repr(float(sum(range(11)) + 10))
    rk.verify()
    # On the maker, in place, then freed and the memory reused: its own values.
    mm = str(tmp_path / "m.bin")
    rk.fe.execute(f"big *= 2\nsmall = np.ones(1000)\nview = big[::2]\nm = np.memmap({mm!r}, "
                  "dtype=np.float64, mode='w+', shape=(300_000,))\nm[:] = 3")
    rk.fe.synced()
    rk.fe.execute("m[:] += 1\nm.flush()\ndel big, view\nagain = np.full(4_000_000, 5.0)")
    rk.fe.synced()
    assert rk.eval(f"(float(again.sum()), float(m.sum()), float(np.fromfile({mm!r}).sum()))") == \
        repr((20_000_000.0, 1_200_000.0, 1_200_000.0))
    rk.verify()
    # Changed in place on the maker, an array moves to the new delta's pages:
    # the old delta is not kept alive by it.
    rk.fe.execute("own = np.arange(4_000_000, dtype=np.float64)")
    rk.fe.synced()
    rk.fe.execute("own += 1")
    rk.fe.synced()
    rk.verify()
    peers = set().union(*(on_shared_pages(rk.pid(r)) for r in rk.peers()))
    assert on_shared_pages(rk.pid(rk.front())) <= peers


def test_an_array_a_user_thread_may_write_keeps_its_own_pages(sharing):
    rk = sharing
    rk.fe.execute("import threading, numpy as np\nstop = threading.Event()\n"
                  "t = threading.Thread(target=stop.wait)\nt.start()\n"
                  "arr = np.arange(4_000_000, dtype=np.float64)")
    rk.fe.synced()  # captured (and swapped, were it to be) before this answers
    assert not on_shared_pages(rk.pid(rk.front()))
    rk.fe.execute("stop.set(); t.join()")


def test_with_share_pages_never_only_the_peers_map_the_delta(tmp_path):
    rk = ReplicatedKernel(tmp_path, env={"NOTEBOOKOS_SHARE_PAGES": "never"})
    try:
        rk.fe.execute("import numpy as np\narr = np.arange(4_000_000, dtype=np.float64)")
        rk.fe.synced()
        rk.verify()
        assert not on_shared_pages(rk.pid(rk.front()))
        assert all(on_shared_pages(rk.pid(r)) for r in rk.peers())
    finally:
        rk.close()
