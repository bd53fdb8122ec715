"""Magics a kernel adds on top of IPython's own."""

from IPython.core.magic import Magics, line_magic, magics_class

from . import placement


@magics_class
class KernelMagics(Magics):
    @line_magic
    def clear(self, arg_s):
        """Clear the output of the current cell."""
        self.shell.display_pub.clear_output()

    @line_magic
    def connect_info(self, arg_s):
        """Print the kernel's connection file, as ipykernel does."""
        path = self.shell.kernel.connection_file
        print(f"Connection file: {path}" if path else "No connection file known.")

    @line_magic
    def notebookos(self, arg_s):
        """Show where this kernel runs: its replicas, which one ran the last
        cell and how long that cell waited to start, and its GPU grant.

        ``%notebookos verify`` checks that every replica holds the same
        namespace (a digest of each name's pickled value, compared)."""
        kernel = self.shell.kernel
        if arg_s.strip() == "verify":
            print(verify(kernel))
            return
        where = placement.current(kernel.placement)
        print(placement.report(where, kernel.last_cell, placement.visible_gpus()))


def verify(kernel):
    import _notebookos

    mine = kernel.sync_digest()
    me = placement.current(kernel.placement)["self"]
    digests = sorted([(me, mine), *_notebookos.peer_digests()])
    lines = [f"replica {rid}: {digest}" for rid, digest in digests]
    if len(digests) == 1:
        verdict = "1 replica: nothing to compare"
    elif all(d == mine for _, d in digests):
        verdict = f"all {len(digests)} replicas hold the same namespace"
    else:
        verdict = "replicas DIFFER"
    return "\n".join([verdict, *lines])
