"""Writes the simulator's calibration file from the latest live bench results.

    python bench/calibrate.py --raft RAFT_BENCH.txt --out calibration.json [RESULT_DIR ...]

Each number comes from the newest results that have it, looked for in the
RESULT_DIRs (default: bench/results, then docs/evidence and its
sub-folders); results carry a day, so the GPU host's runs of the newest day
are pooled (medians). Each number's source is written next to it:

- commit_us: raft-transport's bench, median commit of a 100-byte entry
  among 3 voters (`--raft`, measured by bench/simulate.sh in the same run).
- delta_fixed_s, delta_bytes_per_s: how long after its reply a cell's changes
  are on every replica, as a line through (bytes changed, seconds), from the
  GPU host's training cells (bench/gpu_interactive.py) when there are any,
  else from bench/interactive.py's cells on this machine.
- gpu_offload_bytes_per_s, gpu_restore_bytes_per_s: the largest transfers the
  shim reported in bench/gpu_interactive.py on the GPU host.
- replica_start_s: start-up of a one-replica kernel to its first
  kernel_info_reply (bench/kernel_vs_ipykernel.py).
- scale_out_s, container_start_s: no bench here can measure a cloud server's
  boot or a batch container's start; the numbers are assumptions and their
  sources say so.
- gpu_cache_idle_s: the kernel's default (NOTEBOOKOS_GPU_CACHE_IDLE).
"""

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIRS = [ROOT / "bench" / "results", ROOT / "docs" / "evidence"]
GPU_CACHE_IDLE_S = 600.0
# bench/interactive.py's cells that change nothing, for results written
# before it recorded changed_bytes.
UNCHANGING = {"pass", "rebind a small int"}


def shown(path):
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def newest(dirs, name):
    """(path, parsed JSON) of the newest `name` under dirs, by its "date"."""
    runs = newest_runs(dirs, name)
    return runs[0] if runs else (None, None)


def newest_runs(dirs, name):
    """[(path, parsed JSON)] of every `name` under dirs that carries the
    newest "date": results record a day, not a time, so runs of one day are
    peers and their numbers are pooled rather than one picked by path."""
    found = []
    for d in dirs:
        for path in sorted(Path(d).rglob(name)) if Path(d).is_dir() else []:
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            found.append((str(data.get("date", "")), shown(path), data))
    if not found:
        return []
    day = max(f[0] for f in found)
    return [(path, data) for date, path, data in found if date == day]


def runs_shown(runs):
    """The runs' paths, shortened to their common folder when there are several."""
    if len(runs) <= 1:
        return runs[0][0] if runs else None
    common = os.path.commonpath([p for p, _ in runs])
    return f"{len(runs)} runs under {common}"


def line_fit(points):
    """(intercept, slope) of the least-squares line through (x, y) points."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        raise ValueError("every point has the same size: no rate to fit")
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - slope * mx, slope


def commit_us(raft_text):
    m = re.search(r"commit latency, 100-byte entry, 3 voters .*?median ([0-9.]+)(µs|us|ms|s)\b", raft_text)
    if not m:
        sys.exit("no 3-voter commit median in the raft-transport bench output")
    return float(m.group(1)) * {"µs": 1, "us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]


def transfers(reports):
    """(bytes, seconds) of the largest "N bytes to X in T s" report."""
    best = None
    for r in reports:
        m = re.match(r"\s*(\d+) bytes to \S+ in ([0-9.]+) s", r)
        if m and float(m.group(2)) > 0 and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), float(m.group(2)))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raft", required=True, help="raft-transport bench output")
    ap.add_argument("--out", required=True)
    ap.add_argument("dirs", nargs="*", type=Path)
    args = ap.parse_args()
    dirs = args.dirs or DEFAULT_DIRS
    cal = {"sources": {}}
    dates = []

    raft = Path(args.raft)
    cal["commit_us"] = commit_us(raft.read_text())
    cal["sources"]["commit_us"] = f"{shown(raft)} (3 voters, median), measured in this run"

    gpu_runs = newest_runs(dirs, "gpu_interactive.json")
    gpu = gpu_runs[0][1] if gpu_runs else None
    gpu_path = runs_shown(gpu_runs)
    inter_path, inter = newest(dirs, "interactive*.json")
    points = []
    for _, run in gpu_runs:
        state = run.get("reclaim", {}).get("state_bytes")
        for c in run.get("cells", []):
            if state and c["cell"].startswith("train") and "then_until_every_replica_has_it_s" in c:
                points.append((float(state), c["then_until_every_replica_has_it_s"]))
    if points:
        # Training cells change their whole state: the fixed part comes from
        # this machine's small cells, the rate from the GPU host's.
        small = [c["notebookos-3_all_replicas_s"] - c["notebookos-3_s"]
                 for c in (inter or {}).get("cells", [])
                 if c.get("changed_bytes", None if c["cell"] not in UNCHANGING else 0) == 0]
        fixed = max(statistics.median(small) if small else 0.0, 0.0)
        cal["delta_fixed_s"] = fixed
        cal["delta_bytes_per_s"] = statistics.median(n / max(y - fixed, 1e-9) for n, y in points)
        gbs = sorted({round(n / 1e9, 2) for n, _ in points})
        cal["sources"]["delta_bytes_per_s"] = (
            f"{gpu_path} ({gpu.get('date')}): {len(points)} training cells of "
            f"{' or '.join(f'{g:.2f}' for g in gbs)} GB, median "
            f"{statistics.median(y for _, y in points):.2f} s until every replica has them")
        cal["sources"]["delta_fixed_s"] = (
            f"{inter_path} ({inter.get('date')}): median after-reply sync of cells that change nothing"
            if small else "no small cells measured: 0")
        dates.append(gpu.get("date", ""))
    if "delta_bytes_per_s" not in cal:
        if not inter:
            sys.exit("no bench/interactive.py or bench/gpu_interactive.py result to fit replication to")
        for c in inter["cells"]:
            size = c.get("changed_bytes")
            if size is None:
                m = re.search(r"(\d+) MB array", c["cell"])
                size = float(m.group(1)) * 1e6 if m else None
            if size is not None:
                points.append((float(size), c["notebookos-3_all_replicas_s"] - c["notebookos-3_s"]))
        fixed, slope = line_fit(points)
        cal["delta_fixed_s"] = max(fixed, 0.0)
        cal["delta_bytes_per_s"] = 1 / slope
        src = f"{inter_path} ({inter.get('date')}): line through {len(points)} cells (bytes changed, after-reply sync)"
        cal["sources"]["delta_fixed_s"] = cal["sources"]["delta_bytes_per_s"] = src
    if inter:
        dates.append(inter.get("date", ""))

    measured = [run for _, run in gpu_runs
                if transfers(run.get("offload_reports", [])) and transfers(run.get("restore_reports", []))]
    if measured:
        for key, reports in (("gpu_offload_bytes_per_s", "offload_reports"),
                             ("gpu_restore_bytes_per_s", "restore_reports")):
            moves = sorted((n / secs, n, secs) for n, secs in (transfers(run[reports]) for run in measured))
            rate, n, secs = moves[(len(moves) - 1) // 2]
            cal[key] = rate
            median = f"median of {len(moves)} runs, " if len(moves) > 1 else ""
            cal["sources"][key] = f"{gpu_path} ({gpu.get('date')}): {median}{n / 1e9:.2f} GB in {secs:.3f} s"
    else:
        sys.exit("no bench/gpu_interactive.py result with offload and restore reports")

    start_path, start = newest(dirs, "kernel_vs_ipykernel.json")
    if start and "notebookos-1" in start:
        cal["replica_start_s"] = start["notebookos-1"]["startup_median_ms"] / 1e3
        cal["sources"]["replica_start_s"] = f"{start_path} ({start.get('date', 'undated')}): one-replica start-up median"
        dates.append(start.get("date", ""))
    else:
        cal["replica_start_s"] = 2.0
        cal["sources"]["replica_start_s"] = "assumed: no bench/kernel_vs_ipykernel.py result found"

    cal["scale_out_s"] = 90.0
    cal["sources"]["scale_out_s"] = "assumed: a cloud VM's boot to its agent taking work (not measurable here)"
    cal["container_start_s"] = 5.0
    cal["sources"]["container_start_s"] = "assumed: the Batch baseline's container start"
    cal["gpu_cache_idle_s"] = GPU_CACHE_IDLE_S
    cal["sources"]["gpu_cache_idle_s"] = "the kernel's default NOTEBOOKOS_GPU_CACHE_IDLE"
    cal["date"] = max(d for d in dates if d) if any(dates) else "undated"
    out = {"date": cal.pop("date"), "sources": cal.pop("sources"), **cal}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"calibration from results of {out['date']} written to {args.out}:")
    for key, value in out.items():
        if key not in ("date", "sources"):
            print(f"  {key} = {value:.6g}  ({out['sources'][key]})")


if __name__ == "__main__":
    main()
