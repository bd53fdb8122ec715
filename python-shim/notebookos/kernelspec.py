"""``python -m notebookos install`` and ``uninstall``: the kernelspec.

The options mirror ``python -m ipykernel install``. The spec runs this
environment's Python on ``-m notebookos``, which starts the installed binary
(``launch.py``), so it stays valid when the wheel is upgraded in place.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from . import launch

DEFAULT_NAME = "notebookos"
DEFAULT_DISPLAY_NAME = "Python 3 (notebookos)"


class InstallError(Exception):
    """Why a kernelspec was not installed or removed."""


def kernel_json(display_name: str, env: dict[str, str]) -> dict:
    return {
        "argv": [sys.executable, "-m", "notebookos", "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        # Front-ends send interrupt_request instead of SIGINT: the cell may be
        # running on a replica on another server.
        "interrupt_mode": "message",
        "env": env,
        "metadata": {"debugger": False},
    }


def _scope_args(args: argparse.Namespace) -> list[str]:
    if args.user:
        return ["--user"]
    if args.prefix:
        return ["--prefix", args.prefix]
    if args.sys_prefix:
        return ["--sys-prefix"]
    return []


def _prefix(args: argparse.Namespace) -> str | None:
    return sys.prefix if args.sys_prefix else args.prefix


def install(args: argparse.Namespace) -> Path:
    from jupyter_client.kernelspec import KernelSpecManager

    # Refused here rather than at the first start in a front-end, where the
    # user would see only a kernel that died.
    launch.check_installed()
    env = {}
    for pair in args.env:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InstallError(f"--env takes KEY=VALUE, not {pair!r}")
        env[key] = value
    with tempfile.TemporaryDirectory() as stage:
        for logo in resources.files("notebookos").joinpath("resources").iterdir():
            if logo.name.endswith(".png"):
                (Path(stage) / logo.name).write_bytes(logo.read_bytes())
        with open(Path(stage) / "kernel.json", "w") as f:
            json.dump(kernel_json(args.display_name, env), f, indent=2)
        manager = KernelSpecManager()
        dest = Path(manager.install_kernel_spec(
            stage, args.name, user=args.user, prefix=_prefix(args), replace=True))
    # A spec of the same name earlier on Jupyter's path (ipykernel's python3
    # in the user's directory, say) would still be the one clients start.
    found = KernelSpecManager().find_kernel_specs().get(args.name)
    if found is None or Path(found).resolve() != dest.resolve():
        raise InstallError(
            f"installed in {dest}, but Jupyter starts '{args.name}' from "
            f"{found or 'nowhere'}; remove that one or install with --user")
    return dest


def _spec_dir(args: argparse.Namespace) -> Path:
    from jupyter_core.paths import SYSTEM_JUPYTER_PATH, jupyter_data_dir

    if args.user:
        root = Path(jupyter_data_dir())
    elif _prefix(args):
        root = Path(_prefix(args), "share", "jupyter")
    else:
        root = Path(SYSTEM_JUPYTER_PATH[0])
    return root / "kernels" / args.name


def uninstall(args: argparse.Namespace) -> str:
    spec_dir = _spec_dir(args)
    try:
        argv = json.loads((spec_dir / "kernel.json").read_text())["argv"]
    except (OSError, ValueError, KeyError):
        raise InstallError(f"no kernelspec '{args.name}' in {spec_dir.parent}") from None
    if "notebookos" not in argv:
        raise InstallError(f"{spec_dir} is not a notebookos kernelspec; left as it is")
    shutil.rmtree(spec_dir)
    # Uninstalling the drop-in gives the name back to ipykernel.
    if args.name == "python3":
        have_ipykernel = subprocess.run(
            [sys.executable, "-c", "import ipykernel"], capture_output=True).returncode == 0
        if have_ipykernel:
            subprocess.run([sys.executable, "-m", "ipykernel", "install", "--name", "python3",
                            *_scope_args(args)], check=True, capture_output=True)
            return "kernelspec python3 is ipykernel's again"
    return f"kernelspec {args.name} removed from {spec_dir.parent}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m notebookos", description=(
        "Install or remove the notebookos kernelspec. Anything else runs the kernel "
        "(python -m notebookos --help lists its options)."))
    commands = p.add_subparsers(dest="command", required=True)
    for name, text in [("install", "install the kernelspec"),
                       ("uninstall", "remove the kernelspec")]:
        c = commands.add_parser(name, help=text, description=text)
        scope = c.add_mutually_exclusive_group()
        scope.add_argument("--user", action="store_true",
                           help="for the current user instead of system-wide")
        scope.add_argument("--sys-prefix", action="store_true",
                           help=f"into this environment's prefix ({sys.prefix})")
        scope.add_argument("--prefix", metavar="PREFIX",
                           help="under PREFIX/share/jupyter/kernels")
        c.add_argument("--name", default=DEFAULT_NAME,
                       help=f"the kernelspec's name (default {DEFAULT_NAME}; python3 "
                            "replaces ipykernel's, and uninstall gives it back)")
        if name == "install":
            c.add_argument("--display-name", default=DEFAULT_DISPLAY_NAME,
                           help=f"the name front-ends show (default {DEFAULT_DISPLAY_NAME!r})")
            c.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                           help="set an environment variable for the kernel (repeatable)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if not all(c.isalnum() or c in "._-" for c in args.name) or not args.name:
        print(f"notebookos: kernel names are letters, digits, '.', '_' and '-': {args.name!r}",
              file=sys.stderr)
        return 2
    try:
        if args.command == "install":
            print(f"Installed kernelspec {args.name} in {install(args)}")
        else:
            print(uninstall(args))
    except (InstallError, launch.LaunchError, OSError) as e:
        print(f"notebookos: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
