"""Where a short CPU cell's time goes after GPU cells, on a GPU host with the
notebookos wheel installed (a diagnostic, not a benchmark with a target).

A model with Adam is built and trained on the GPU through notebookos (3
replicas); then `sum(range(10**6))` runs as a cell, timed inside the cell
and from the front-end, on ipykernel and notebookos in turn: back to back,
with a second's pause before each, and after the torch state is deleted.
The time inside the cell tells the interpreter's speed apart from the time
around it.

Usage: python bench/cpu_cell_probe.py
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SETUP = ("import torch, time\n"
         "model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(16)]).cuda()\n"
         "opt = torch.optim.Adam(model.parameters())\n"
         "X = torch.randn(512, 4096, device='cuda')\n")
TRAIN = ("for _ in range(5):\n"
         "    opt.zero_grad(); model(X).pow(2).mean().backward(); opt.step()\n"
         "torch.cuda.synchronize()\n")
CPU = ("t0 = time.perf_counter(); s = sum(range(10**6)); "
       "print('in', round((time.perf_counter() - t0) * 1000, 2))")
RUNS = 6


def main():
    tmp = Path(tempfile.mkdtemp(prefix="nbos-probe-"))
    sock = tmp / "agent.sock"
    agent = subprocess.Popen([sys.executable, "-m", "notebookos", "agent", "--socket", str(sock)])
    while not sock.exists():
        time.sleep(0.05)
    specs = tmp / "specs" / "kernels"
    for name, argv, env in [
        ("notebookos", [sys.executable, "-m", "notebookos", "-f", "{connection_file}"],
         {"NOTEBOOKOS_AGENT_SOCKET": str(sock)}),
        ("python3", [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"], {}),
    ]:
        (specs / name).mkdir(parents=True)
        (specs / name / "kernel.json").write_text(json.dumps(
            {"argv": argv, "display_name": name, "language": "python", "env": env}))
    os.environ.update(JUPYTER_PATH=str(tmp / "specs"), IPYTHONDIR=str(tmp / "ipython"),
                      NOTEBOOKOS_STATE_DIR=str(tmp / "state"))
    from frontend import Frontend, stream_text
    from replicas import ReplicatedKernel

    nb = ReplicatedKernel(tmp / "kernel")
    ipy = Frontend(kernel_name="python3")
    try:
        ipy.execute("import time")
        for code in (SETUP, TRAIN):
            nb.fe.execute("%%gpus 1\n" + code, timeout=300)
            nb.fe.synced(timeout=300)

        def timed(fe, pause):
            time.sleep(pause)
            t = time.perf_counter()
            _, msgs = fe.execute(CPU)
            return round((time.perf_counter() - t) * 1000, 1), float(stream_text(msgs).split()[-1])

        def rounds(label, pause):
            rows = {"ipykernel": [], "notebookos": []}
            for _ in range(RUNS):
                rows["ipykernel"].append(timed(ipy, pause))
                rows["notebookos"].append(timed(nb.fe, pause))
                nb.fe.synced(timeout=60)
            print(label, "(ms to idle, ms inside):", json.dumps(rows), flush=True)

        rounds("back to back", 0.0)
        rounds("a second's pause", 1.0)
        nb.fe.execute("del model, opt, X")
        nb.fe.synced(timeout=60)
        rounds("no torch state", 0.0)
    finally:
        nb.close()
        ipy.close()
        agent.kill()


if __name__ == "__main__":
    main()
