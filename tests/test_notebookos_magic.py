"""``%notebookos``: replicas, who ran the last cell and how long it waited,
and the GPU binding, as a notebook user sees them."""

import re
import socket
import stat
from datetime import datetime, timedelta, timezone

import pytest

from frontend import Frontend, stream_text


@pytest.fixture
def fe():
    # One process: what %notebookos says of a replica group is tested in test_replicas.
    f = Frontend("notebookos-single")
    yield f
    f.close()


def notebookos(fe):
    reply, msgs = fe.execute("%notebookos")
    assert reply["status"] == "ok", reply
    return stream_text(msgs)


def execute_sent_at(fe, code, date):
    """An execute_request whose header says it was sent at `date`."""
    msg = fe.kc.session.msg("execute_request", {"code": code, "silent": False})
    msg["header"]["date"] = date.isoformat().replace("+00:00", "Z")
    fe.kc.shell_channel.send(msg)
    reply = fe.shell_reply(msg["header"]["msg_id"])["content"]
    fe.iopub_until_idle(msg["header"]["msg_id"])
    return reply


def test_shows_this_process_as_the_only_replica(fe):
    pid = fe.km.provisioner.pid
    out = notebookos(fe)
    assert out.startswith("notebookos: 1 replica (NOTEBOOKOS_REPLICAS=1"), out
    assert re.search(
        rf"replica 1: talks to Jupyter\s+host {re.escape(socket.gethostname())}\s+pid {pid}\s+running"
        r"\s+<- this process", out), out
    assert "Last cell: none has run yet" in out


def test_last_cell_and_its_wait_from_the_request_date(fe):
    sent = datetime.now(timezone.utc) - timedelta(seconds=5)
    reply = execute_sent_at(fe, "x = 1", sent)
    count = reply["execution_count"]
    fe.execute("y = 2", silent=True)
    out = notebookos(fe)
    m = re.search(r"Last cell: \[(\d+)\] ran on replica 1 \(host (\S+), pid (\d+)\); "
                  r"waited ([\d.]+) ms from request to start", out)
    assert m, out
    assert int(m[1]) == count and m[2] == socket.gethostname()
    assert int(m[3]) == fe.km.provisioner.pid
    # The request says it was sent 5 s ago, so the cell waited at least
    # that; the silent request after it (as front-ends send their own) was
    # not the user's cell and, sent just now, would show a shorter wait.
    assert float(m[4]) >= 5000, out


def test_wait_is_unknown_when_the_request_date_is_in_the_future(fe):
    execute_sent_at(fe, "x = 1", datetime.now(timezone.utc) + timedelta(hours=1))
    assert "waited unknown (no usable request date)" in notebookos(fe)


def test_no_gpu_grant_and_no_visible_gpus(fe):
    fe.execute("import os; os.environ['CUDA_VISIBLE_DEVICES'] = '-1'")
    out = notebookos(fe)
    assert "GPU grant: none: no GPU agent on this host; cells run on CPU" in out
    assert "GPUs this process can see: none" in out


def test_gpus_visible_without_a_grant_are_shown_as_such(fe, tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        "echo 'GPU 0: Fake A (UUID: GPU-aaaa)'\n"
        "echo 'GPU 1: Fake B (UUID: GPU-bbbb)'\n"
    )
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    fe.execute(f"import os; os.environ['PATH'] = {str(tmp_path)!r} + os.pathsep + os.environ['PATH']"
               "\nos.environ['CUDA_VISIBLE_DEVICES'] = '1'")
    out = notebookos(fe)
    assert "GPU grant: none: no GPU agent on this host" in out
    assert "GPUs this process can see anyway (not granted by notebookos):\n  GPU 1: Fake B" in out
    assert "Fake A" not in out


def test_the_replication_lag_reads_as_cells_and_bytes():
    # The module alone: the shim's package needs the kernel's built-in module.
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "python-shim" / "notebookos_shim" / "placement.py"
    spec = importlib.util.spec_from_file_location("placement_alone", path)
    placement = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(placement)
    _replication = placement._replication

    lag = {"mode": "background", "unsynced_cells": 2, "holder": 3, "unsynced_bytes": 812_000_000}
    assert _replication(lag) == (
        "in the background, after each reply; 2 cells, 812.0 MB not yet on a peer"
        " (only replica 3 has them)")
    # The front does not know the bytes a peer holds.
    assert _replication(dict(lag, unsynced_cells=1, unsynced_bytes=None)).endswith(
        "; 1 cell not yet on a peer (only replica 3 has them)")
    assert _replication(dict(lag, unsynced_cells=0)).endswith(
        "every replica has every earlier cell's changes")
    assert _replication(dict(lag, mode="strict", unsynced_cells=0)).startswith("strict")
