"""``python -m notebookos``: the kernelspec installer, or the kernel itself."""

import sys

from . import kernelspec, launch


def main() -> int:
    args = sys.argv[1:]
    if args[:1] in (["install"], ["uninstall"]):
        return kernelspec.main(args)
    if args[:1] in (["-h"], ["--help"]):
        # The binary's own help follows; it knows nothing of these two.
        print("python -m notebookos install|uninstall [--help]   the kernelspec\n")
        sys.stdout.flush()
    try:
        return launch.run_kernel(args)
    except (launch.LaunchError, OSError) as e:
        print(f"notebookos: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
