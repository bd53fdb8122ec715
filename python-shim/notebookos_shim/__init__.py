"""The Python side of the notebookos kernel.

The Rust kernel owns the sockets and the wire protocol; this package runs
requests through IPython's InteractiveShell and hands every output to Rust
through the built-in ``_notebookos`` module.
"""

from .kernel import start

__all__ = ["start"]
