"""The chaos run's short form (`tests/chaos/run.py`): a 200-cell generated
notebook through 3 replicas while replicas are killed, frozen and restarted
and (inside a network namespace, when root) packets are dropped; nothing
may be lost. The long form is `bench/chaos.sh`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def can_netns():
    return os.geteuid() == 0 and shutil.which("ip") and shutil.which("tc")


def test_chaos_short_form_loses_nothing(tmp_path):
    out = tmp_path / "chaos.json"
    args = [sys.executable, str(HERE / "chaos" / "run.py"), "--cells", "200", "--faults", "5",
            "--seed", os.environ.get("NOTEBOOKOS_TEST_SEED", "1"), "--json", str(out)]
    netns = bool(can_netns())
    if netns:
        args.append("--netns")
    else:
        print("not root or no iproute2: no namespace, so no packet drops in this run")
    run = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    print(run.stdout.splitlines()[-1])
    assert report["variables_lost"] == [], report
    assert report["unexpected"] == [], report
    assert sum(report["faults"].values()) == 5, report
    assert report["fault_errored"], "the kill_running fault must end its cell"
    for e in report["fault_errored"]:
        assert e["error"].startswith("ReplicaLost: replica "), e
    if netns:
        assert report["packets_dropped"] > 0, report
    assert report["ok"] and run.returncode == 0
