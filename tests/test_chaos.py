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
    args = [sys.executable, str(HERE / "chaos" / "run.py"), "--cells", "200", "--faults", "6",
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
    assert sum(report["faults"].values()) == 6, report
    # Killed while its changes streamed: whatever was lost was told, and re-run.
    assert len(report["changes_lost_told"]) == 1, report
    assert report["fault_errored"], "the kill_running fault must end its cell"
    for e in report["fault_errored"]:
        assert e["error"].startswith("ReplicaLost: replica "), e
    if netns:
        assert report["packets_dropped"] > 0, report
    assert report["ok"] and run.returncode == 0


def test_chaos_through_the_cluster_loses_nothing(tmp_path):
    """The same run on five network-namespace servers: peers placed by the
    policy, a peer's server cut off for 16 s (replaced, then back), packets
    dropped on the front's link, kills and a restart of replica 1."""
    if not can_netns():
        import pytest

        pytest.skip("needs root and iproute2 for network namespaces")
    out = tmp_path / "chaos.json"
    run = subprocess.run(
        [sys.executable, str(HERE / "chaos" / "run.py"), "--cells", "200", "--faults", "6",
         "--seed", os.environ.get("NOTEBOOKOS_TEST_SEED", "1"), "--cluster", "--json", str(out)],
        capture_output=True, text=True, timeout=900)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    print(run.stdout.splitlines()[-1])
    assert report["variables_lost"] == [] and report["unexpected"] == [], report
    assert set(report["faults"]) == {"kill_peer", "kill_running", "partition", "drop_packets",
                                     "kill_front", "kill_streaming"}, report
    assert report["partitioned"] and report["packets_dropped"] > 0, report
    for e in report["fault_errored"]:
        assert e["error"].startswith("ReplicaLost: replica "), e
    assert report["ok"] and run.returncode == 0
