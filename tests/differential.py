"""Differential runs: public notebooks this project did not write, executed
through ipykernel and through notebookos (3 replicas), every output
compared after normalising only what varies from run to run.

The corpus is the notebooks shipped in pinned source distributions from
PyPI (nbclient's and papermill's test notebooks, which those projects run
against ipykernel themselves), fetched once into ``target/notebook-corpus``.

    python tests/differential.py [--only NAME ...] [--json REPORT]

runs the whole corpus twice, once with the cells on replica 1 and once on
the other replicas (``bench/differential.sh`` does, and keeps the report);
``tests/test_differential.py`` runs a fast subset.
"""

import argparse
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "target" / "notebook-corpus"

# Source distributions whose notebooks make the corpus (sdist, where in it).
SOURCES = {
    "nbclient==0.10.2": "tests/files",
    "papermill==2.6.0": "papermill/tests/notebooks",
}

# Notebooks that are not a comparison of outputs, with the reason.
NOT_COMPARED = {
    "Autokill.ipynb": "kills its own kernel process by pid; what survives is the point of nbclient's test, not an output",
    "Interrupt.ipynb": "waits for an interrupt that nbclient's own test sends",
    "Parallel Execute A.ipynb": "waits on a file that its twin B writes when both run at once",
    "Parallel Execute B.ipynb": "waits on a file that its twin A writes when both run at once",
    "keyboard_interrupt.ipynb": "raises KeyboardInterrupt to test papermill's handling of it",
    "test_autosave.ipynb": "sleeps to test papermill's autosave timer",
    "notimplemented_translator.ipynb": "declares a kernel language no kernel has (papermill's translator test)",
    "blank-vscode.ipynb": "has no cells",
}

# Kernel-specific text that may differ with no difference to the user:
# object addresses, temporary paths, process ids, dates and durations.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_NORMALISE = [
    (_ANSI, ""),
    (re.compile(r"0x[0-9a-fA-F]{6,}"), "0xADDR"),
    # Widget model ids, message and session ids (uuid4, with or without dashes).
    (re.compile(r"\b[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\b"), "UUID"),
    (re.compile(r"/tmp/[^\s'\"]+"), "/tmp/PATH"),
    (re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?"), "DATETIME"),
    (re.compile(r"\b\d+(\.\d+)?\s?(ms|µs|us|ns|s)\b"), "DURATION"),
]


# A traceback's frames inside the kernel's own code (raw_input refusing
# input, say) name ipykernel's files there and the shim's here: the one
# difference the comparison leaves out, listed in the README.
_KERNEL_FRAME = re.compile(r"^File [^\n]*/(ipykernel|notebookos_shim)/")


def normalise_text(text):
    for pattern, repl in _NORMALISE:
        text = pattern.sub(repl, text)
    return text


def corpus():
    """Every notebook of the corpus: {name: path}; downloads on first use."""
    found = {}
    for req, inside in SOURCES.items():
        name, version = req.split("==")
        sdist = CACHE / f"{name}-{version}.tar.gz"
        if not sdist.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            f"--no-binary={name}", req, "-d", str(CACHE)], check=True)
        root = CACHE / f"{name}-{version}"
        if not root.exists():
            with tarfile.open(sdist) as tar:
                tar.extractall(CACHE, filter="data")
        for nb in sorted((root / inside).rglob("*.ipynb")):
            if nb.name in found:
                raise RuntimeError(f"two notebooks named {nb.name}: {found[nb.name]} and {nb}")
            found[nb.name] = nb
    return found


def run(path, kernel_name, timeout=120, on_peer=False):
    """The notebook's cells after execution by `kernel_name`, normalised.
    `on_peer`: replica 1 (the one Jupyter talks to) yields every cell, so
    the cells run on the other replicas and their output is relayed."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel_name, timeout=timeout, allow_errors=True,
                            resources={"metadata": {"path": str(path.parent)}})
    if on_peer:
        async def steer(notebook):
            msg = client.kc.session.msg("notebookos_steer_request", {"yield": [1]})
            client.kc.control_channel.send(msg)
            while True:
                m = await client.kc.control_channel.get_msg(timeout=60)
                if m["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                    assert m["content"]["status"] == "ok", m["content"]
                    return

        client.on_notebook_start = steer
    error = None
    try:
        client.execute()
    except Exception as e:  # the kernel died, a cell timed out: part of the result
        error = f"{type(e).__name__}: {normalise_text(str(e)).splitlines()[0] if str(e) else ''}"
    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cells.append({
            "source": cell.source,
            "execution_count": cell.get("execution_count"),
            "outputs": [output(o) for o in cell.get("outputs", [])],
        })
    return {"cells": cells, "error": error}


def output(o):
    o = dict(o)
    kind = o["output_type"]
    if kind == "stream":
        return {"type": kind, "name": o["name"], "text": normalise_text(o["text"])}
    if kind == "error":
        return {"type": kind, "ename": o["ename"], "evalue": normalise_text(o["evalue"]),
                # Frames are told apart before paths are normalised away.
                "traceback": [normalise_text(line) for line in o["traceback"]
                              if not _KERNEL_FRAME.match(_ANSI.sub("", line))]}
    data = {k: _normalise_value(v) for k, v in o.get("data", {}).items()}
    out = {"type": kind, "data": data, "metadata": o.get("metadata", {})}
    if kind == "execute_result":
        out["execution_count"] = o.get("execution_count")
    return out


def _normalise_value(v):
    if isinstance(v, str):
        return normalise_text(v)
    if isinstance(v, dict):
        return {k: _normalise_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_normalise_value(x) for x in v]
    return v


def differences(expected, got):
    """Human-readable differences between two runs of one notebook."""
    diffs = []
    if expected["error"] != got["error"]:
        diffs.append(f"run: ipykernel {expected['error']!r}, notebookos {got['error']!r}")
    if len(expected["cells"]) != len(got["cells"]):
        diffs.append(f"{len(expected['cells'])} code cells vs {len(got['cells'])}")
    for i, (a, b) in enumerate(zip(expected["cells"], got["cells"])):
        if a["execution_count"] != b["execution_count"]:
            diffs.append(f"cell {i}: execution_count {a['execution_count']} vs {b['execution_count']}")
        if a["outputs"] != b["outputs"]:
            diffs.append(f"cell {i}: outputs differ\n  ipykernel:  {json.dumps(a['outputs'])[:600]}\n"
                         f"  notebookos: {json.dumps(b['outputs'])[:600]}")
    return diffs


def compare(path, on_peer=False, reference="ipykernel-reference", kernel="notebookos"):
    expected = run(path, reference)
    got = run(path, kernel, on_peer=on_peer)
    return differences(expected, got)


def ipykernel_spec(spec_dir):
    """ipykernel, from the Python running this, as kernel "ipykernel-reference"."""
    d = Path(spec_dir) / "kernels" / "ipykernel-reference"
    d.mkdir(parents=True, exist_ok=True)
    (d / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ipykernel (reference)", "language": "python"}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="notebook file names")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args()
    sys.path[:0] = [str(ROOT / "tests")]
    import conftest

    conftest.pytest_configure(None)
    ipykernel_spec(conftest._SPEC_DIR)
    report = {"compared": {}, "not_compared": {}}
    for name, path in corpus().items():
        if args.only and name not in args.only:
            continue
        if name in NOT_COMPARED:
            report["not_compared"][name] = NOT_COMPARED[name]
            continue
        for where, on_peer in (("replica 1", False), ("a peer", True)):
            diffs = compare(path, on_peer)
            report["compared"][f"{name} ({where})"] = diffs
            print(f"{'EQUAL' if not diffs else 'DIFFERENT'}: {name}, cells on {where}", flush=True)
            for d in diffs:
                print("   " + d.replace("\n", "\n   "), flush=True)
    equal = sum(1 for d in report["compared"].values() if not d)
    print(f"{equal} of {len(report['compared'])} runs equal ({len(report['compared']) // 2} "
          f"notebooks, cells on replica 1 and on a peer); "
          f"{len(report['not_compared'])} not compared (see NOT_COMPARED)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if equal == len(report["compared"]) else 1


if __name__ == "__main__":
    sys.exit(main())
