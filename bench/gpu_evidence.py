"""GPU evidence on a real GPU host (run by bench/gpu_evidence.sh there).

Through the replicated kernel (3 replicas, a real agent):
1. a cell trains a small torch model for a few hundred steps on the GPU
   (replica 1); the next cell evaluates it on replica 2; both print numbers
   that must equal the same code run in one plain Python process;
2. nvidia-smi after each cell: the GPU memory the kernel's processes hold
   between cells;
3. reclaim (after a cell: model to host memory) and restore (before the next
   GPU cell: back to the granted GPU) times for ~1 GiB and ~10 GiB models,
   from the kernel's log.

Usage: python gpu_evidence.py --out DIR (with the notebookos wheel installed)
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

TRAIN = """\
import torch, time
torch.manual_seed(0)
torch.use_deterministic_algorithms(True)
dev = 'cuda'
X = torch.randn(4096, 64, device=dev)
w_true = torch.randn(64, 1, device=dev)
y = (X @ w_true > 0).float()
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)).to(dev)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = torch.nn.BCEWithLogitsLoss()
for step in range(300):
    opt.zero_grad()
    loss = loss_fn(model(X), y)
    loss.backward()
    opt.step()
print('train_loss', repr(loss.item()))
"""

EVAL = """\
import torch
torch.manual_seed(1)
Xt = torch.randn(2048, 64, device='cuda')
yt = (Xt @ w_true.to('cuda') > 0).float()
with torch.no_grad():
    logits = model(Xt)
    eval_loss = torch.nn.BCEWithLogitsLoss()(logits, yt).item()
    acc = ((logits > 0).float() == yt).float().mean().item()
print('eval_loss', repr(eval_loss))
print('eval_acc', repr(acc))
print('param_sum', repr(sum(p.double().sum().item() for p in model.parameters())))
"""

# The installed wheel, started as its kernelspec starts it.
KERNEL = [sys.executable, "-m", "notebookos"]


def smi():
    q = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True).stdout.strip()
    apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()
    return {"gpus": q, "processes": apps}


def numbers(text):
    return {k: float(v) for k, v in re.findall(r"^(\w+) ([-\d.e+]+)$", text, re.M)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--big-gib", type=int, nargs="+", default=[1, 10])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="nbos-gpu-"))
    env_common = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    os.environ.update(env_common)
    results = {"nvidia_smi": {}}

    # The reference: the same two cells in one process.
    ref = subprocess.run([sys.executable, "-c", TRAIN + EVAL], capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    results["single_process"] = numbers(ref.stdout)

    sock = tmp / "agent.sock"
    agent = subprocess.Popen([*KERNEL, "agent", "--socket", str(sock), "--metrics", "127.0.0.1:9464"],
                             stderr=open(out / "agent.log", "w"))
    while not sock.exists():
        time.sleep(0.05)
    specs = tmp / "specs" / "kernels" / "notebookos"
    specs.mkdir(parents=True)
    (specs / "kernel.json").write_text(json.dumps({
        "argv": [*KERNEL, "-f", "{connection_file}"],
        "display_name": "notebookos", "language": "python", "interrupt_mode": "message",
        "env": {"NOTEBOOKOS_AGENT_SOCKET": str(sock),
                "NOTEBOOKOS_STATE_DIR": str(tmp / "state"),
                "NOTEBOOKOS_LOG": "info,openraft=off,notebookos_kernel::replica=debug", **env_common},
    }))
    os.environ["JUPYTER_PATH"] = str(tmp / "specs")
    os.environ["IPYTHONDIR"] = str(tmp / "ipython")
    from frontend import Frontend, stream_text

    log = out / "kernel.log"
    fe = Frontend(kernel_name="notebookos", stderr=open(log, "w"))
    try:
        def cell(code, on, timeout=900):
            fe.steer([r for r in (1, 2, 3) if r != on])
            t = time.perf_counter()
            reply, msgs = fe.execute(code, timeout=timeout)
            took = time.perf_counter() - t
            text = stream_text(msgs) + stream_text(msgs, "stderr")
            assert reply["status"] == "ok", (reply, text)
            return text, took

        def save():
            (out / "gpu_evidence.json").write_text(json.dumps(results, indent=2))

        results["nvidia_smi"]["before"] = smi()
        text, took = cell("%%gpus 1\nimport os\nprint('pid', os.getpid())\n" + TRAIN, on=1)
        results["train"] = {**numbers(text), "seconds": took}
        results["nvidia_smi"]["after_train_cell"] = smi()
        text, took = cell("%%gpus 1\nimport os\nprint('pid', os.getpid())\n" + EVAL, on=2)
        results["eval"] = {**numbers(text), "seconds": took}
        results["nvidia_smi"]["after_eval_cell"] = smi()
        save()
        results["identical_to_single_process"] = all(
            results["single_process"][k] == v
            for part in ("train", "eval") for k, v in results[part].items() if k in results["single_process"]
        )
        for gib in args.big_gib:
            layers = gib  # 16384 x 16384 float32 = 1 GiB each
            _, took_make = cell(
                "%%gpus 1\nimport torch\n"
                f"big = torch.nn.Sequential(*[torch.nn.Linear(16384, 16384, bias=False) for _ in range({layers})]).cuda()\n"
                "torch.cuda.synchronize()", on=1)
            results["nvidia_smi"][f"after_{gib}gib_model_cell"] = smi()
            _, took_use = cell("%%gpus 1\nfloat(big[0].weight[0, 0])", on=1)
            _, took_cpu = cell("del big", on=1)
            results[f"model_{gib}gib"] = {"make_cell_s": took_make, "use_cell_s": took_use}
            save()
        text, _ = cell("%notebookos", on=1)
        results["notebookos_magic"] = text
    finally:
        fe.close()
        try:
            results["metrics"] = urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=5).read().decode()
        except OSError as e:
            results["metrics"] = f"unavailable: {e}"
        agent.kill()
    logtext = log.read_text()
    results["reclaim_reports"] = re.findall(r"GPU state moved to host report=(.*)", logtext)
    results["restore_reports"] = re.findall(r"GPU bound; device state restored gpus=\S+ report=(.*)", logtext)
    results["delta_reports"] = re.findall(r"state delta sent (.*)", logtext)
    (out / "gpu_evidence.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "metrics"}, indent=2))


if __name__ == "__main__":
    main()
