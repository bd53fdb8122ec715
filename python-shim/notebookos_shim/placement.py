"""Where the kernel runs: its replicas, its GPU binding, and what the last
cell waited for; the ``%notebookos`` magic shows it to the user.

With replicas, the Rust side describes the group (``_notebookos.placement()``);
a single-replica kernel (``NOTEBOOKOS_REPLICAS=1``) is described by ``local()``.
No GPU agent grants GPUs yet, so cells run on CPU unless the user picks a GPU.
"""

import json
import os
import shutil
import socket
import subprocess
from datetime import datetime, timezone


def local():
    """The placement of a kernel that is one process on this host; ``self``
    is the id of the replica this process is."""
    return {
        "self": 1,
        "replicas": [
            {
                "id": 1,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "role": "talks to Jupyter",
                "state": "running",
            }
        ],
        "gpu": {"grant": None, "reason": "no GPU agent on this host; cells run on CPU"},
    }


def current(single):
    """The group's placement when there are replicas, else ``single``."""
    import _notebookos

    group = _notebookos.placement()
    if group is None:
        return single
    group = json.loads(group)
    host = socket.gethostname()
    return {
        "self": group["self"],
        "replicas": [
            {
                "id": r["id"],
                # A cluster names each replica's server; else they run here.
                "host": r.get("host") or host,
                "pid": r.get("pid") or "?",
                "role": r["role"] + (", Raft leader" if r.get("leader") else ""),
                "state": r["state"],
            }
            for r in group["replicas"]
        ],
        "gpu": _grant_now(single["gpu"]),
        "gpu_usage": group.get("gpu_usage"),
        "replication": group.get("replication"),
    }


def _grant_now(single):
    """The GPUs granted to the cell running now (`%%gpus N`), if any."""
    granted = os.environ.get("NOTEBOOKOS_GPUS_GRANTED")
    if granted is None:
        return {"grant": None, "reason": "this cell asked for no GPU (use %%gpus N); it runs on CPU"}
    return {"grant": f"GPU {granted} of this host, for this cell", "reason": None}


def visible_gpus():
    """GPUs this process could use on its own, granted or not.

    Asked each time rather than cached: CUDA_VISIBLE_DEVICES can change
    in a cell, and nvidia-smi is the ground truth when it is installed.
    """
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is not None and mask.strip() in ("", "-1"):
        return []
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    gpus = [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU ")]
    if mask is not None:
        wanted = {m.strip() for m in mask.split(",")}
        gpus = [g for i, g in enumerate(gpus) if str(i) in wanted or _uuid(g) in wanted]
    return gpus


def _uuid(nvidia_smi_line):
    _, _, rest = nvidia_smi_line.partition("(UUID: ")
    return rest.rstrip(")")


def wait_seconds(header, started):
    """Seconds from the front-end sending an execute_request (its header's
    ``date``) to the cell starting; None when the header has no usable date
    or the two clocks disagree so much that the answer would be negative."""
    date = header.get("date")
    if not date:
        return None
    try:
        sent = datetime.fromisoformat(date.replace("Z", "+00:00"))
    except ValueError:
        return None
    if sent.tzinfo is None:
        # The message spec's dates are UTC.
        sent = sent.replace(tzinfo=timezone.utc)
    wait = started - sent.timestamp()
    return wait if wait >= 0 else None


def report(placement, last_cell, gpus):
    """The text ``%notebookos`` prints."""
    replicas = placement["replicas"]
    lines = [f"notebookos: {len(replicas)} replica{'s' if len(replicas) != 1 else ''}"]
    if len(replicas) == 1:
        lines[0] += " (NOTEBOOKOS_REPLICAS=1: this process is the whole kernel)"
    lines.append("Replicas:")
    by_id = {}
    for r in replicas:
        by_id[r["id"]] = r
        me = "  <- this process" if r["id"] == placement["self"] else ""
        lines.append(
            f"  replica {r['id']}: {r['role']}  host {r['host']}  pid {r['pid']}  {r['state']}{me}"
        )
    if last_cell is None:
        lines.append("Last cell: none has run yet")
    else:
        r = by_id.get(last_cell["replica"], {"host": "?", "pid": "?"})
        wait = last_cell["wait_s"]
        waited = "unknown (no usable request date)" if wait is None else f"{wait * 1000:.1f} ms"
        lines.append(
            f"Last cell: [{last_cell['execution_count']}] ran on replica {last_cell['replica']}"
            f" (host {r['host']}, pid {r['pid']}); waited {waited} from request to start"
        )
    replication = placement.get("replication")
    if replication:
        lines.append(f"Replication: {_replication(replication)}")
    usage = placement.get("gpu_usage")
    if usage:
        lines.append(
            f"GPU-seconds for this kernel: {usage['held_gpu_seconds']:.1f} held, "
            f"{usage['used_gpu_seconds']:.1f} running cells, "
            f"{usage.get('cached_gpu_seconds', 0):.1f} cached between cells, "
            f"{usage.get('moving_gpu_seconds', 0):.1f} moving state ({usage['grants']} grants, "
            f"{usage.get('reused', 0)} reused from the cache, {usage.get('revoked', 0)} revoked, "
            f"{usage['expired']} expired)"
        )
    grant = placement["gpu"]["grant"]
    if grant is None:
        lines.append(f"GPU grant: none: {placement['gpu']['reason']}")
    else:
        lines.append(f"GPU grant: {grant}")
    if gpus:
        anyway = " anyway (not granted by notebookos)" if grant is None else ""
        lines.append(f"GPUs this process can see{anyway}:")
        lines.extend(f"  {g}" for g in gpus)
    else:
        lines.append("GPUs this process can see: none")
    return "\n".join(lines)


def _replication(r):
    """The replication lag: cells (and bytes, where known) not yet on a peer."""
    if r["mode"] == "strict":
        mode = "strict (a reply waits until its cell's changes reach the other replicas)"
    else:
        mode = "in the background, after each reply"
    cells = r["unsynced_cells"]
    if not cells:
        return f"{mode}; every replica has every earlier cell's changes"
    size = r.get("unsynced_bytes")
    size = "" if size is None else f", {size / 1e6:.1f} MB"
    return (f"{mode}; {cells} cell{'s' if cells != 1 else ''}{size} not yet on a peer"
            f" (only replica {r['holder']} has them)")
