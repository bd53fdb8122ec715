"""Interactive speed with replication: realistic cells through ipykernel,
notebookos with one replica and notebookos with three (keeping or sharing the
winner's pages, see SHARING), alternately, in one run.

For every cell: time to idle (execute_request sent -> status idle, what the
user waits for) per kernel, median over rounds; for three replicas also the
time until every replica holds the cell's changes (`notebookos_sync_request`
answered). After the 800 MB array: the RSS, PSS and host memory (see
``memory``) of all of each kernel's processes.

Usage: python bench/interactive.py [--rounds 5] [--json FILE]
Needs kernelspecs "python3" (ipykernel), "notebookos" and "notebookos-single"
on JUPYTER_PATH (bench/run.sh writes them).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from frontend import Frontend  # noqa: E402
from replicas import ReplicatedKernel  # noqa: E402

MB = 1e6
# Three replicas where the replica that ran a cell also gives up its own copy of
# large arrays for the delta's pages (NOTEBOOKOS_SHARE_PAGES=always); the other
# three-replica kernel never does (peers map the delta either way).
SHARING = "notebookos-3-shared"
CELLS = [
    ("pass", "pass"),
    ("rebind a small int", "x = 1"),
    ("build a 100k-element list", "lst = list(range(100_000))"),
    ("build a 100k-entry dict", "dct = {i: str(i) for i in range(100_000)}"),
    ("import numpy", "import numpy as np"),
    ("create an 80 MB array", "a = np.ones(10_000_000)"),
    ("a += 1 on it", "a += 1"),
    ("a read-only cell naming it", "float(a[0])"),
    ("create an 800 MB array", "b = np.ones(100_000_000)"),
    ("b += 1 on it", "b += 1"),
    ("a read-only cell naming it (800 MB)", "float(b[-1])"),
    ("a 1M-row DataFrame", "import pandas as pd\n"
     "df = pd.DataFrame({'k': np.arange(1_000_000), 'v': np.linspace(0, 1, 1_000_000)})"),
    ("delete a name", "del lst"),
]
AFTER_BIG = "create an 800 MB array"
# Bytes of the values a cell creates or changes: what its delta carries
# (bench/calibrate.py fits the replication cost to them).
CHANGED_BYTES = {
    "create an 80 MB array": 80 * MB, "a += 1 on it": 80 * MB,
    "create an 800 MB array": 800 * MB, "b += 1 on it": 800 * MB,
    "pass": 0, "rebind a small int": 0, "a read-only cell naming it": 0,
    "a read-only cell naming it (800 MB)": 0,
}


SHARED_BLOB = "/memfd:notebookos-blob-"


def memory(pids):
    """(RSS, PSS, host) in bytes, summed over a kernel's processes.

    RSS counts a page once per process that touched it, PSS splits it among
    them; neither counts the pages of a shared delta (a sealed memfd, see
    raft-transport's shm module) that no process has touched yet, though they
    take RAM all the same. "host" is what the kernel costs the machine: PSS
    of everything else, plus each shared delta in full, once."""
    rss = pss = other_pss = 0
    shared = {}  # memfd inode -> bytes
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps").read_text()
        except OSError:
            continue
        in_blob = False
        for line in text.splitlines():
            # A mapping's line: range, perms, offset, device (major:minor), inode[, path].
            head = line.split(maxsplit=5)
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:
                in_blob = len(head) == 6 and head[5].startswith(SHARED_BLOB)
                if in_blob:
                    start, end = (int(x, 16) for x in head[0].split("-"))
                    shared[head[4]] = max(shared.get(head[4], 0), end - start)
                continue
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                kb = int(rest.split()[0]) * 1024
                if key == "Rss":
                    rss += kb
                else:
                    pss += kb
                    if not in_blob:
                        other_pss += kb
    return rss, pss, other_pss + sum(shared.values())


class Kernel:
    def __init__(self, name, spec, tmp, env=None):
        self.name = name
        if spec == "notebookos":
            self.rk = ReplicatedKernel(tmp / name, env=env)
            self.fe = self.rk.fe
        else:
            self.rk = None
            self.fe = Frontend(kernel_name=spec)
        self.fe.execute("pass")

    def pids(self):
        if self.rk is not None:
            return [m["pid"] for m in self.rk.group()["members"]]
        reply, _ = self.fe.execute("pass", user_expressions={"p": "__import__('os').getpid()"})
        return [int(reply["user_expressions"]["p"]["data"]["text/plain"])]

    def run(self, code):
        """(seconds to idle, seconds until every replica holds the changes)."""
        t = time.perf_counter()
        reply, _ = self.fe.execute(code, timeout=600)
        idle = time.perf_counter() - t
        assert reply["status"] == "ok", (self.name, code, reply)
        if self.rk is None:
            return idle, idle
        self.fe.synced(timeout=600)
        return idle, time.perf_counter() - t

    def close(self):
        (self.rk or self.fe).close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nbos-interactive-"))
    kernels = [Kernel("ipykernel", "python3", tmp), Kernel("notebookos-1", "notebookos-single", tmp),
               Kernel("notebookos-3", "notebookos", tmp, {"NOTEBOOKOS_SHARE_PAGES": "never"}),
               Kernel(SHARING, "notebookos", tmp, {"NOTEBOOKOS_SHARE_PAGES": "always"})]
    idle = {k.name: {c: [] for c, _ in CELLS} for k in kernels}
    synced = {k.name: {c: [] for c, _ in CELLS} for k in kernels}
    mem, mem_unread = {}, {}
    try:
        for r in range(args.rounds):
            for label, code in CELLS:
                # Rotate which kernel goes first, so none always runs on a warm cache.
                order = kernels[r % len(kernels):] + kernels[:r % len(kernels)]
                for k in order:
                    t_idle, t_sync = k.run(code)
                    idle[k.name][label].append(t_idle)
                    if k.rk is not None:
                        synced[k.name][label].append(t_sync)
                    if label == AFTER_BIG and r == args.rounds - 1:
                        if k.rk is not None:
                            # As a user leaves it: the peers have the delta mapped
                            # but have read none of it, so RSS misses those pages.
                            mem_unread[k.name] = memory(k.pids())
                            # Every replica has applied every change (a log barrier),
                            # and has read every page: RSS counts each once per process.
                            k.rk.verify()
                        mem[k.name] = memory(k.pids())
                print(f"round {r + 1} {label}: " + ", ".join(
                    f"{k.name} {idle[k.name][label][-1] * 1000:.1f} ms" for k in kernels), flush=True)
    finally:
        for k in kernels:
            k.close()

    rows = []
    for label, _ in CELLS:
        base = statistics.median(idle["ipykernel"][label])
        row = {"cell": label, "ipykernel_s": base}
        if label in CHANGED_BYTES:
            row["changed_bytes"] = CHANGED_BYTES[label]
        for name in ("notebookos-1", "notebookos-3", SHARING):
            row[f"{name}_s"] = statistics.median(idle[name][label])
            row[f"{name}_ratio"] = row[f"{name}_s"] / base
        for name in ("notebookos-3", SHARING):
            row[f"{name}_all_replicas_s"] = statistics.median(synced[name][label])
        rows.append(row)
    print(f"\n{'cell':40} {'ipykernel':>10} {'nbos-1':>10} {'nbos-3':>10} {'ratio-3':>8} {'all replicas':>13}"
          f" {'shared':>10} {'ratio':>6} {'all replicas':>13}")
    for row in rows:
        print(f"{row['cell']:40} {row['ipykernel_s'] * 1000:8.1f}ms {row['notebookos-1_s'] * 1000:8.1f}ms "
              f"{row['notebookos-3_s'] * 1000:8.1f}ms {row['notebookos-3_ratio']:8.2f} "
              f"{row['notebookos-3_all_replicas_s'] * 1000:11.1f}ms {row[SHARING + '_s'] * 1000:8.1f}ms "
              f"{row[SHARING + '_ratio']:6.2f} {row[SHARING + '_all_replicas_s'] * 1000:11.1f}ms")
    base_rss, base_host = mem["ipykernel"][0], mem["ipykernel"][2]
    print(f"\nmemory after the 800 MB array (all of a kernel's processes):")
    for name, (rss, pss, host) in mem.items():
        print(f"  {name:14} RSS {rss / MB:8.0f} MB ({rss / base_rss:.2f}x ipykernel)  PSS {pss / MB:8.0f} MB"
              f"  host {host / MB:8.0f} MB ({host / base_host:.2f}x ipykernel)")
        if name in mem_unread:
            rss, pss, host = mem_unread[name]
            print(f"  {'':14} before the verify read every page: RSS {rss / MB:8.0f} MB "
                  f"({rss / base_rss:.2f}x)  host {host / MB:8.0f} MB ({host / base_host:.2f}x)")
    worst = max(rows, key=lambda r: r["notebookos-3_ratio"])
    print(f"\nworst cell with 3 replicas: {worst['cell']} at {worst['notebookos-3_ratio']:.2f}x ipykernel")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "cells": rows,
             "memory_after_800mb": {n: {"rss_bytes": m[0], "pss_bytes": m[1], "host_bytes": m[2]}
                                    for n, m in mem.items()},
             "memory_after_800mb_before_verify": {
                 n: {"rss_bytes": m[0], "pss_bytes": m[1], "host_bytes": m[2]}
                 for n, m in mem_unread.items()},
             "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
