"""Magics a kernel adds on top of IPython's own."""

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from . import placement


@magics_class
class KernelMagics(Magics):
    @line_magic
    def clear(self, arg_s):
        """Clear the output of the current cell."""
        self.shell.display_pub.clear_output()

    @cell_magic
    def gpus(self, line, cell):
        """``%%gpus N``: run this cell with N GPUs. The kernel reads N before
        the cell runs (only a replica granted N GPUs may run it); here the
        body just runs."""
        result = self.shell.run_cell(cell)
        result.raise_error()

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
        report = placement.report(where, kernel.last_cell, placement.visible_gpus())
        # Only a replicated kernel has started namespace replication.
        sync = getattr(kernel, "_statesync", None)
        skipped = sync.unpicklable if sync is not None else []
        if skipped:
            names = ", ".join(f"{name} ({why})" for name, why in skipped)
            report += ("\nNot replicated (only on the replica that made them; lost if it"
                       f" fails): {names}")
        print(report)


def verify(kernel):
    import json

    import _notebookos

    from .statesync import namespace_digest

    me = placement.current(kernel.placement)["self"]
    names = {me: json.loads(kernel.sync_digest())}
    for rid, digests in _notebookos.peer_digests():
        try:
            names[rid] = json.loads(digests)
        except ValueError:
            names[rid] = {"<error>": digests}
    totals = {rid: namespace_digest(d) for rid, d in names.items()}
    lines = [f"replica {rid}: {totals[rid]}" for rid in sorted(totals)]
    if len(totals) == 1:
        return "\n".join(["1 replica: nothing to compare", *lines])
    if len(set(totals.values())) == 1:
        return "\n".join([f"all {len(totals)} replicas hold the same namespace", *lines])
    mine = names[me]
    differ = sorted({n for d in names.values() for n in set(d) | set(mine) if d.get(n) != mine.get(n)})
    return "\n".join(["replicas DIFFER", *lines, "names that differ: " + ", ".join(differ)])
