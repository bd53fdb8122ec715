"""Starting the kernel with this environment's Python.

The wheel carries the kernel as an extension module, ``notebookos._kernel``,
and the kernel runs inside this very Python: cells run in the interpreter
``python`` is, as under ipykernel. (An embedded libpython is not always as
fast: Debian's and Ubuntu's Pythons are linked statically and their shared
library runs the same code about 1.6x slower.)

A source build is a binary that embeds CPython (named by
``NOTEBOOKOS_KERNEL_BIN``): it carries no path to a libpython, so the
library is found here, from the Python that runs this module
(``sysconfig``), and handed to the loader through ``LD_LIBRARY_PATH``. The
kernel takes that entry off again before any cell runs (``libpython.rs``),
so cells and their subprocesses see the user's own ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

BINARY = "notebookos-kernel"
# Set by the launcher, read by the kernel: which LD_LIBRARY_PATH entry is ours.
LIBPYTHON_DIR_VAR = "NOTEBOOKOS_LIBPYTHON_DIR"
# A binary to run in place of the wheel's: a source build, or the test suite's.
BINARY_OVERRIDE_VAR = "NOTEBOOKOS_KERNEL_BIN"


class LaunchError(Exception):
    """What stops the kernel from starting, said so that a user can act on it."""


def libpython_name() -> str:
    """The shared library's file name as the binary's loader asks for it."""
    return sysconfig.get_config_var("INSTSONAME") or (
        f"libpython{sysconfig.get_python_version()}{sys.abiflags}.so.1.0"
    )


def libpython_dir() -> str:
    """The directory holding this Python's shared libpython.

    Debian's and Ubuntu's system Pythons are linked statically yet ship the
    shared library in a separate package, so the file itself is looked for
    rather than trusting ``Py_ENABLE_SHARED``.
    """
    name = libpython_name()
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    candidates = [libdir, os.path.join(libdir, multiarch) if multiarch else "",
                  sysconfig.get_config_var("LIBPL") or "",
                  os.path.join(sys.base_prefix, "lib")]
    for directory in filter(None, candidates):
        if os.path.exists(os.path.join(directory, name)):
            return directory
    raise LaunchError(
        f"notebookos needs CPython's shared library {name}, which {sys.executable} "
        f"(Python {sysconfig.get_python_version()}) does not have (looked in "
        f"{', '.join(dict.fromkeys(filter(None, candidates)))}). "
        "Debian/Ubuntu: apt-get install lib"
        f"python{sysconfig.get_python_version()}; pyenv: reinstall with "
        "PYTHON_CONFIGURE_OPTS=--enable-shared; conda and python.org builds ship it."
    )


def kernel_binary() -> str:
    """The kernel binary: the override if set, else the one this wheel installed."""
    override = os.environ.get(BINARY_OVERRIDE_VAR)
    if override:
        if not os.access(override, os.X_OK):
            raise LaunchError(f"{BINARY_OVERRIDE_VAR}={override} is not an executable")
        return override
    # The wheel's RECORD names where pip put the binary (the environment's
    # scripts directory, whichever scheme it used); read directly, as
    # importlib.metadata would take longer than the rest of the launch.
    site = Path(__file__).resolve().parent.parent
    for record in site.glob("notebookos-*.dist-info/RECORD"):
        for line in record.read_text().splitlines():
            path = line.split(",", 1)[0]
            if path.rsplit("/", 1)[-1] == BINARY:
                binary = (site / path).resolve()
                if os.access(binary, os.X_OK):
                    return str(binary)
    raise LaunchError(
        f"no {BINARY} binary is installed for {sys.executable}: install the notebookos "
        f"wheel for this Python (pip install notebookos), or set {BINARY_OVERRIDE_VAR} "
        "to a binary built from source"
    )


def kernel_environment(libdir: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the kernel binary starts in."""
    env = dict(os.environ if environ is None else environ)
    # The embedded interpreter takes this as its sys.executable, so sys.prefix,
    # site-packages, `!pip` and subprocesses are this environment's.
    env["NOTEBOOKOS_PYTHON"] = sys.executable
    env[LIBPYTHON_DIR_VAR] = libdir
    previous = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = f"{libdir}:{previous}" if previous else libdir
    return env


def _installed_module():
    """The kernel the wheel installed as an extension module, or None (a
    development install)."""
    try:
        from . import _kernel
    except ImportError:
        return None
    return _kernel


def kernel_module():
    """The kernel module to run in this Python, or None when a binary runs
    instead: no module is installed, or an override names a binary."""
    return None if os.environ.get(BINARY_OVERRIDE_VAR) else _installed_module()


def check_installed() -> None:
    """Raises LaunchError if this Python has no kernel to start."""
    if kernel_module() is None:
        kernel_binary()
        libpython_dir()


def run_kernel(args: list[str]) -> int:
    """Runs the kernel with ``args``: in this Python if the wheel installed
    its module (and no override names a binary), else by exec'ing the binary."""
    module = kernel_module()
    if module is None:
        exec_kernel(args)
    argv = [BINARY, *args]
    seed = module.hash_seed(argv)
    if seed is not None and os.environ.get("PYTHONHASHSEED") != str(seed):
        # Every replica must hash strings alike, and an interpreter takes
        # its seed only as it starts: start this one again with the group's.
        os.environ["PYTHONHASHSEED"] = str(seed)
        os.execv(sys.executable, [sys.executable, "-m", "notebookos", *args])
    return module.main(argv)


def exec_kernel(args: list[str]) -> None:
    """Replaces this process with the kernel binary; returns only on failure."""
    binary = kernel_binary()
    env = kernel_environment(libpython_dir())
    os.execve(binary, [binary, *args], env)
