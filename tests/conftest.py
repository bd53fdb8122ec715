"""Fixtures: kernelspecs for the kernel under test, in a private JUPYTER_PATH.

The kernel binary is ``$NOTEBOOKOS_KERNEL_BIN`` or the workspace's debug
build; its Python is the one running the tests (which has python-shim
installed). Two specs are made: ``notebookos`` (interrupts by message, as
installed), ``notebookos-signal`` (interrupts by SIGINT) and
``notebookos-single`` (NOTEBOOKOS_REPLICAS=1: one process, no replicas).
"""

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_BIN = Path(
    os.environ.get("NOTEBOOKOS_KERNEL_BIN", ROOT / "target" / "debug" / "notebookos-kernel")
)

_SPEC_DIR = tempfile.mkdtemp(prefix="notebookos-kernelspecs-")


def write_spec(name, display_name, interrupt_mode="message", extra_args=(), python=None, env=None):
    """A kernelspec for the kernel under test, in the private JUPYTER_PATH
    entry; ``python`` is the environment the kernel embeds (default: the
    one running the tests)."""
    d = Path(_SPEC_DIR) / "kernels" / name
    d.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [str(KERNEL_BIN), "-f", "{connection_file}", *extra_args],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": interrupt_mode,
        "env": {"NOTEBOOKOS_PYTHON": str(python or sys.executable), **(env or {})},
    }
    (d / "kernel.json").write_text(json.dumps(spec))


def pytest_configure(config):
    if not KERNEL_BIN.exists():
        raise RuntimeError(f"kernel binary not built: {KERNEL_BIN} (run cargo build)")
    write_spec("notebookos", "Python 3 (notebookos)")
    write_spec("notebookos-signal", "Python 3 (notebookos, signal)", interrupt_mode="signal")
    write_spec("notebookos-single", "Python 3 (notebookos, 1 replica)", env={"NOTEBOOKOS_REPLICAS": "1"})
    # Private history so tests neither read nor write the user's.
    os.environ["IPYTHONDIR"] = tempfile.mkdtemp(prefix="notebookos-ipython-")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [_SPEC_DIR] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p]
    )
