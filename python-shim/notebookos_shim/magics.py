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
        cell and how long that cell waited to start, and its GPU grant."""
        kernel = self.shell.kernel
        print(placement.report(kernel.placement, kernel.last_cell, placement.visible_gpus()))
