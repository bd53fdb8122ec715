"""A long session with 3 replicas: memory per replica and a late joiner's catch-up.

Every cell rebinds a 10 KB value. Reports each replica's RSS after cell
--early (default 500) and after the last cell (--cells, default 10,000), and
the time a replacement replica takes to join (from the kill of a peer until
the group is 3 caught-up voters again) after --early-join (default 100) cells
and after the last cell. The same cells run on ipykernel (kernelspec
"python3") and on one notebookos replica ("notebookos-single") first, as the
baselines of the same run: IPython itself keeps every cell's source (In,
history), so a kernel's growth is compared with theirs. Targets (issue
"Replica state machine"): growth at most 10 MiB per replica; the late join
within 2x of the early one.

Usage: python long_session.py [--cells 10000] [--early 500] [--json FILE]
Needs the kernelspecs "notebookos", "notebookos-single" and "python3" on
JUPYTER_PATH (bench/run.sh makes them).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from frontend import Frontend  # noqa: E402
from replicas import ReplicatedKernel, rss_mib  # noqa: E402

CELL = "x = [{i}] * 1280  # about 10 KB"


def members(rk):
    return {m["id"]: m["pid"] for m in rk.group()["members"]}


def rss_by_replica(rk):
    return {i: round(rss_mib(pid), 1) for i, pid in sorted(members(rk).items())}


def join_time(rk):
    """Kills one peer and times its replacement's catch-up."""
    victim = rk.peers()[-1]
    t = time.perf_counter()
    rk.kill(victim)
    rk.wait_members(3, timeout=300)
    return time.perf_counter() - t


def baseline(kernel_name, cells, early):
    """RSS growth of a one-process kernel over the same cells."""
    fe = Frontend(kernel_name=kernel_name)
    try:
        pid = fe.km.provisioner.process.pid
        for i in range(1, cells + 1):
            reply, _ = fe.execute(CELL.format(i=i))
            assert reply["status"] == "ok", reply
            if i == early:
                at_early = rss_mib(pid)
        growth = round(rss_mib(pid) - at_early, 1)
    finally:
        fe.close()
    print(f"{kernel_name}: growth {growth} MiB from cell {early} to {cells}", flush=True)
    return growth


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=10_000)
    ap.add_argument("--early", type=int, default=500)
    ap.add_argument("--early-join", type=int, default=100)
    ap.add_argument("--json")
    args = ap.parse_args()

    out = {"cells": args.cells}
    out["ipykernel_growth_mib"] = baseline("python3", args.cells, args.early)
    out["single_growth_mib"] = baseline("notebookos-single", args.cells, args.early)
    with tempfile.TemporaryDirectory() as tmp:
        rk = ReplicatedKernel(Path(tmp) / "k")
        try:
            t0 = time.perf_counter()
            for i in range(1, args.cells + 1):
                reply, _ = rk.fe.execute(CELL.format(i=i))
                assert reply["status"] == "ok", reply
                if i == args.early_join:
                    out["join_s_early"] = round(join_time(rk), 2)
                    print(f"join after {i} cells: {out['join_s_early']} s", flush=True)
                if i == args.early:
                    out["rss_mib_early"] = rss_by_replica(rk)
                    print(f"RSS after {i} cells: {out['rss_mib_early']}", flush=True)
                if i % 1000 == 0:
                    print(f"{i} cells, {time.perf_counter() - t0:.0f} s, RSS {rss_by_replica(rk)}",
                          flush=True)
            out["rss_mib_late"] = rss_by_replica(rk)
            out["join_s_late"] = round(join_time(rk), 2)
            rk.verify()
            assert rk.eval("x[0]") == str(args.cells)
        finally:
            rk.close()
    # Replica ids change when a peer is replaced; growth is compared for the ids present
    # at both points (replica 1 and the untouched peer).
    both = sorted(set(out["rss_mib_early"]) & set(out["rss_mib_late"]))
    out["growth_mib"] = {i: round(out["rss_mib_late"][i] - out["rss_mib_early"][i], 1) for i in both}
    out["join_ratio"] = round(out["join_s_late"] / out["join_s_early"], 2)
    print(f"growth per replica (MiB) from cell {args.early} to {args.cells}: {out['growth_mib']} "
          f"(target <= 10; ipykernel {out['ipykernel_growth_mib']}, one notebookos replica "
          f"{out['single_growth_mib']}); join after {args.early_join} cells {out['join_s_early']} s, after "
          f"{args.cells} {out['join_s_late']} s, ratio {out['join_ratio']} (target <= 2)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
