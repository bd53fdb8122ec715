"""IPython's InteractiveShell, with display and tracebacks sent to Rust."""

import os
import sys

from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell, InteractiveShellABC
from traitlets import Any, Bool, Type

import _notebookos

from . import parent
from .compiler import CellCompiler
from .jsonutil import dumps


def _flush_std():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


class RustDisplayPublisher(DisplayPublisher):
    """display(), update_display() and clear_output() on iopub."""

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
        _flush_std()
        content = {"data": data, "metadata": metadata or {}, "transient": transient or {}}
        _notebookos.publish("update_display_data" if update else "display_data", dumps(content),
                            None, None, parent.explicit())

    def clear_output(self, wait=False):
        _notebookos.publish("clear_output", dumps({"wait": bool(wait)}), None, None,
                            parent.explicit())


class RustDisplayHook(DisplayHook):
    """The value of a cell's last expression, sent as execute_result."""

    def start_displayhook(self):
        self._content = {"execution_count": None, "data": {}, "metadata": {}}

    def write_output_prompt(self):
        self._content["execution_count"] = self.prompt_count

    def write_format_data(self, format_dict, md_dict=None):
        self._content["data"] = format_dict
        self._content["metadata"] = md_dict or {}

    def finish_displayhook(self):
        _flush_std()
        content, self._content = self._content, None
        if content and content["data"]:
            _notebookos.publish("execute_result", dumps(content), None, None, parent.explicit())


class NotebookosShell(InteractiveShell):
    displayhook_class = Type(RustDisplayHook)
    display_pub_class = Type(RustDisplayPublisher)
    compiler_class = Type(CellCompiler)

    # The kernel object libraries find as get_ipython().kernel.
    kernel = Any()
    # Set by exit()/quit(): the kernel shuts down after the cell.
    exit_now = Bool(False)
    keepkernel_on_exit = Bool(False)
    _last_traceback = None
    _last_traceback_during_displayhook = False

    # ipykernel's shell exposes the request being handled; libraries that
    # publish their own messages parent them with it.
    @property
    def parent_header(self):
        return self.kernel.parent_header if self.kernel is not None else {}

    def get_parent(self):
        return self.kernel.get_parent() if self.kernel is not None else {}

    def set_parent(self, message):
        """ipykernel's: this thread's output (and, on the main thread, the
        kernel's notion of the request) answers ``message`` from now on."""
        if self.kernel is not None:
            self.kernel.set_parent(self.kernel._parent_ident["shell"], message)
        parent.set_explicit(message)

    def set_thread_parent(self, message):
        """This thread's output answers ``message`` until
        ``reset_thread_parent`` is given what this returns."""
        return parent.set_explicit(message)

    def reset_thread_parent(self, token):
        parent.reset(token)

    def init_environment(self):
        env = os.environ
        env["TERM"] = "xterm-color"
        env["CLICOLOR"] = "1"
        env["PAGER"] = "cat"
        env["GIT_PAGER"] = "cat"
        # `?` help goes to the front-end's pager as a payload.
        from IPython.core import page
        from IPython.core.payloadpage import page as payload_page

        page.page = payload_page

    def init_virtualenv(self):
        # The interpreter already is the environment's own Python.
        pass

    def init_magics(self):
        super().init_magics()
        from .magics import KernelMagics

        self.register_magics(KernelMagics)

    def ask_exit(self):
        self.exit_now = not self.keepkernel_on_exit
        self.payload_manager.write_payload(
            {"source": "ask_exit", "keepkernel": self.keepkernel_on_exit}
        )

    def set_next_input(self, text, replace=False):
        self.payload_manager.write_payload(
            {"source": "set_next_input", "text": text, "replace": replace}
        )

    def _showtraceback(self, etype, evalue, stb):
        if getattr(self.displayhook, "_content", None) is not None:
            self._last_traceback_during_displayhook = True
        _flush_std()
        content = {"traceback": stb, "ename": str(etype.__name__), "evalue": str(evalue)}
        _notebookos.publish("error", dumps(content))
        self._last_traceback = stb

    # `!cmd` output is captured through a pipe and printed, so it reaches
    # the notebook (the kernel has no terminal).
    system = InteractiveShell.system_piped

    def enable_gui(self, gui=None):
        if gui not in (None, "inline"):
            raise NotImplementedError(
                f"GUI event loop {gui!r} is not supported by notebookos; use %matplotlib inline"
            )


InteractiveShellABC.register(NotebookosShell)
