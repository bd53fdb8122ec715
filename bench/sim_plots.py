"""Plots of a `notebookos-kernel simulate --out DIR` run: GPUs provisioned
over time (the oracle's curve is the bound), the CDF of interactivity delay,
and its tail (the share of cells waiting longer than x, log-log), one PNG
each per DIR."""

import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(run: Path) -> None:
    timeline = defaultdict(lambda: ([], [], []))
    with open(run / "timeline.csv") as f:
        for row in csv.DictReader(f):
            t, p, h = timeline[row["mode"]]
            t.append(int(row["minute"]) / 60)
            p.append(int(row["gpus_provisioned"]))
            h.append(int(row["gpus_held"]))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for mode, (t, p, _) in timeline.items():
        ax.step(t, p, where="post", label=f"{mode} provisioned", linewidth=1)
    # The oracle provisions exactly what cells run: the line nothing can beat.
    if "notebookos-3" in timeline:
        t, _, h = timeline["notebookos-3"]
        ax.step(t, h, where="post", label="notebookos-3 bound to cells", linewidth=1, linestyle=":")
    ax.set_xlabel("hours")
    ax.set_ylabel("GPUs")
    ax.set_title(f"GPUs provisioned over time ({run.name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run / "gpus_provisioned.png", dpi=120)
    plt.close(fig)

    delays = defaultdict(list)
    with open(run / "delays.csv") as f:
        for row in csv.DictReader(f):
            delays[row["mode"]].append(int(row["delay_ms"]) / 1000)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, d in delays.items():
        d.sort()
        n = len(d)
        # Zero delays cannot sit on a log axis: draw them at 1 ms.
        ax.step([max(x, 1e-3) for x in d], [(i + 1) / n for i in range(n)], where="post", label=mode)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("interactivity delay: submission to start of execution (s)")
    ax.set_ylabel("fraction of cells")
    ax.set_title(f"Delay CDF ({run.name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run / "delay_cdf.png", dpi=120)
    plt.close(fig)

    # The tail: what the CDF squeezes against 1.0 is spread over decades here.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, d in delays.items():
        n = len(d)
        xs = [max(x, 1e-3) for x in d]
        ax.step(xs, [1 - (i + 1) / n + 1 / n for i in range(n)], where="post", label=mode)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(0.005, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("interactivity delay (s)")
    ax.set_ylabel("fraction of cells waiting at least this long")
    ax.set_title(f"Delay tail ({run.name}); dotted: 0.5 % of cells")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run / "delay_tail.png", dpi=120)
    plt.close(fig)
    print(f"wrote {run / 'gpus_provisioned.png'}, {run / 'delay_cdf.png'} and {run / 'delay_tail.png'}")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        plot(Path(arg))
