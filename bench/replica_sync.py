"""How long until every replica holds what a cell created: a cell makes a
1 GiB numpy array on replica 1, then a trivial cell is sent that only
another replica may run (it runs there only after applying the delta).

sync = (submit big cell -> reply of the trivial cell on the other replica)
       - (the same big cell on a single-replica kernel)
and the effective throughput is the array size over sync, to compare with
raft-transport's bulk stream (its bench prints that number).

Usage: python replica_sync.py [--mib 1024] [--repeat 3] [--json FILE]
Needs kernelspecs "notebookos" and "notebookos-single" on JUPYTER_PATH.
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


def cell(mib):
    return f"import numpy as np\nbig = np.ones({mib} * (1 << 20) // 8)\nbig[0] = 2.0"


def timed(fe, code, **kw):
    t = time.perf_counter()
    reply, _ = fe.execute(code, timeout=600, **kw)
    assert reply["status"] == "ok", reply
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()

    single = Frontend(kernel_name="notebookos-single")
    try:
        compute = [timed(single, cell(args.mib)) for _ in range(args.repeat)]
    finally:
        single.close()

    tmp = Path(tempfile.mkdtemp(prefix="nbos-sync-"))
    env = {**os.environ, "NOTEBOOKOS_STATE_DIR": str(tmp)}
    fe = Frontend(kernel_name="notebookos", env=env)
    total = []
    try:
        fe.execute("pass")
        for _ in range(args.repeat):
            fe.steer([2, 3])  # the big cell runs on replica 1
            t = time.perf_counter()
            fe.execute(cell(args.mib), timeout=600)
            fe.steer([1, 3])  # only replica 2 may run the next cell
            reply, _ = fe.execute("assert big[0] == 2.0 and big.size * 8 == %d" % (args.mib << 20),
                                  timeout=600)
            assert reply["status"] == "ok", reply
            total.append(time.perf_counter() - t)
            fe.steer([2, 3])
            fe.execute("del big")
    finally:
        fe.close()

    sync = statistics.median(total) - statistics.median(compute)
    res = {
        "array_mib": args.mib,
        "cell_on_one_replica_s": statistics.median(compute),
        "until_another_replica_ran_next_cell_s": statistics.median(total),
        "sync_s": sync,
        "sync_gb_per_s": (args.mib << 20) / sync / 1e9,
    }
    print(f"{args.mib} MiB array: cell alone {res['cell_on_one_replica_s']:.2f} s; "
          f"until replica 2 ran the next cell {res['until_another_replica_ran_next_cell_s']:.2f} s; "
          f"sync {sync:.2f} s = {res['sync_gb_per_s']:.2f} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())
