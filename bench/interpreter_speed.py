"""How fast the same Python code runs inside each kernel, apart from the
protocol: times a few pure-Python statements with timeit in this Python's
executable, in an ipykernel cell and in a notebookos cell (the interpreter it
embeds is this Python's shared libpython). A distribution whose executable is
linked statically (Debian's, Ubuntu's) runs the same code faster than its own
libpython does; this shows by how much on the host it runs on.

Each statement runs 15 times a round, 3 rounds with the three in turn; the
best time is reported.

Usage: python bench/interpreter_speed.py [--out FILE]   (notebookos installed)
"""

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

STATEMENTS = {
    "sum(range(10**6))": "sum(range(10**6))",
    "build a 100k list": "[i * 2 for i in range(100_000)]",
    "build a 100k dict": "{i: str(i) for i in range(100_000)}",
}
ROUNDS = 3
PROBE = ("import timeit, json\n"
         "print(json.dumps({k: min(timeit.repeat(v, number=1, repeat=15)) for k, v in %r.items()}))")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    probe = PROBE % STATEMENTS
    ldd = subprocess.run(["ldd", sys.executable], capture_output=True, text=True).stdout
    result = {
        "executable": sys.executable,
        "executable_links_libpython": "libpython" in ldd,
        "libdir": sysconfig.get_config_var("LIBDIR"),
        "config_args": sysconfig.get_config_var("CONFIG_ARGS"),
        "seconds_best": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="nbos-speed-"))
    specs = tmp / "specs" / "kernels"
    for name, argv in [("notebookos", [sys.executable, "-m", "notebookos", "-f", "{connection_file}"]),
                       ("python3", [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"])]:
        (specs / name).mkdir(parents=True)
        (specs / name / "kernel.json").write_text(json.dumps(
            {"argv": argv, "display_name": name, "language": "python"}))
    os.environ["JUPYTER_PATH"] = str(tmp / "specs")
    os.environ["IPYTHONDIR"] = str(tmp / "ipython")
    os.environ["NOTEBOOKOS_STATE_DIR"] = str(tmp / "state")
    from frontend import Frontend, stream_text

    def in_executable():
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    def in_kernel(fe):
        reply, msgs = fe.execute(probe, timeout=300)
        assert reply["status"] == "ok", reply
        return json.loads(stream_text(msgs).strip().splitlines()[-1])

    kernels = {"ipykernel cell": Frontend(kernel_name="python3"),
               "notebookos cell": Frontend(kernel_name="notebookos")}
    best = result["seconds_best"]
    try:
        # Rounds, each place in turn: a shared machine that slows down for a
        # while slows all three alike.
        for _ in range(ROUNDS):
            places = [("python executable", in_executable)]
            places += [(label, lambda fe=fe: in_kernel(fe)) for label, fe in kernels.items()]
            for label, measure in places:
                # Replication after the last notebookos cell must not share
                # the cores with the next measurement.
                time.sleep(1.0)
                for stmt, seconds in measure().items():
                    best.setdefault(label, {})
                    best[label][stmt] = min(seconds, best[label].get(stmt, seconds))
    finally:
        for fe in kernels.values():
            fe.close()
    base = result["seconds_best"]["python executable"]
    result["ratio_to_executable"] = {
        label: {k: round(v / base[k], 3) for k, v in times.items()}
        for label, times in result["seconds_best"].items()
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
