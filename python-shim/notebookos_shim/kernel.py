"""Request handlers, called by the Rust kernel as ``dispatch(msg_type, msg, buffers)``.

Each returns the reply content as JSON (or None for messages without a
reply); Rust checks it against the typed reply and sends it.
"""

import ast
import builtins
import functools
import getpass
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings

import _notebookos

# The kernel's own log (the process's stderr, not the cell's): never shown
# in a notebook, nor handed to handlers the user configures.
_log = logging.getLogger("notebookos")
_log.propagate = False
if not _log.handlers:
    _handler = logging.StreamHandler(sys.__stderr__)
    _handler.setFormatter(logging.Formatter("notebookos shim: %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(logging.INFO)

from . import parent as parent_of_output
from . import placement
from .jsonutil import dumps


def _quiet(method):
    """The kernel's own work between cells (replication, GPU binding) warns
    into the kernel's log, never into the user's cell."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return method(*args, **kwargs)
            finally:
                for w in caught:
                    _log.info("%s: %s: %s (%s:%s)", method.__name__, w.category.__name__,
                              w.message, w.filename, w.lineno)

    return run


class _IopubSocket:
    """Stands in for ipykernel's iopub socket in ``session.send(kernel.iopub_socket, ...)``."""

    def __repr__(self):
        return "<notebookos iopub>"


class Session:
    """The part of jupyter_client's Session that libraries call on a kernel."""

    def __init__(self, kernel):
        self._kernel = kernel
        self.username = "kernel"
        self.session = ""

    def send(self, stream, msg_or_type, content=None, parent=None, ident=None,
             buffers=None, track=False, header=None, metadata=None):
        if isinstance(msg_or_type, dict):
            msg_type = msg_or_type["header"]["msg_type"]
            content = msg_or_type.get("content", content)
            metadata = msg_or_type.get("metadata", metadata)
        else:
            msg_type = msg_or_type
        if stream is not self._kernel.iopub_socket:
            raise ValueError("notebookos: libraries may only send on the iopub socket")
        parent_header = None
        if parent is not None:
            parent_header = dumps(parent.get("header", parent))
        _notebookos.publish(msg_type, dumps(content or {}), dumps(metadata or {}),
                            buffers or None, parent_header)


class Kernel:
    implementation = "notebookos"

    def __init__(self, shell, comm_manager, connection_file):
        self.shell = shell
        self.comm_manager = comm_manager
        self.connection_file = connection_file
        self.iopub_socket = _IopubSocket()
        self.session = Session(self)
        # Subshells run requests on their own threads: what a request sets
        # up is per thread; threads the user starts see the main shell's.
        self._local = threading.local()
        self._main_thread = threading.main_thread()
        self._main_parent = {}
        self._main_ident = []
        # The newest control request (the front's, or code sent on control,
        # which runs on a thread of its own).
        self._control_parent = {}
        self._control_ident = []
        self._control_thread = None
        # Replicas and GPU binding, as %notebookos shows them.
        self.placement = placement.local()
        # The last cell that ran to the end: who ran it, how long it waited.
        self.last_cell = None
        # The main thread's asyncio loop, run between requests (start sets it).
        self.idle_loop = None
        self._handlers = {
            "execute_request": self.execute_request,
            "complete_request": self.complete_request,
            "inspect_request": self.inspect_request,
            "is_complete_request": self.is_complete_request,
            "history_request": self.history_request,
            "comm_info_request": self.comm_info_request,
            "comm_open": self.comm_open,
            "comm_msg": self.comm_msg,
            "comm_close": self.comm_close,
            "shutdown_request": self.shutdown_request,
        }

    # What libraries expect of ipykernel's kernel object.
    def get_parent(self, channel=None):
        """The request being handled on ``channel`` (by default, the one of
        this thread: control on the thread of code sent on control)."""
        if channel is None:
            on_control = threading.current_thread() is self._control_thread
            channel = "control" if on_control else "shell"
        if channel == "control":
            return self._control_parent
        return getattr(self._local, "parent", self._main_parent)

    def set_parent(self, ident, parent, channel="shell"):
        if channel == "control":
            self._control_ident, self._control_parent = ident, parent
            return
        self._local.ident, self._local.parent = ident, parent
        if threading.current_thread() is self._main_thread:
            self._main_ident, self._main_parent = ident, parent

    @property
    def _parent_ident(self):
        # Private in ipykernel but read by front-end extensions: the ZMQ
        # routing identities of the request on each channel.
        return {"shell": getattr(self._local, "ident", self._main_ident),
                "control": self._control_ident}

    @property
    def parent_header(self):
        return self.get_parent().get("header", {})

    def idle(self):
        """Rust calls this on the main thread while no request is queued for
        it; False when there is no loop to run."""
        return self.idle_loop is not None and self.idle_loop.run()

    def serve_comms(self):
        """Comm messages that came while a cell awaits, served in its loop;
        the cell's parent is its own again afterwards."""
        ident, cell = self._parent_ident["shell"], self.get_parent("shell")
        try:
            _notebookos.serve_comms(self)
        finally:
            self.set_parent(ident, cell)

    def dispatch(self, msg_type, msg, buffers, idents=(), channel="shell", control=None):
        """Runs a request that came on ``channel``. ``control``: the newest
        request the front served on control, as (message, idents)."""
        if control is not None:
            self.set_parent(list(control[1]), json.loads(control[0]), "control")
        if channel == "control":
            self._control_thread = threading.current_thread()
        parent = json.loads(msg)
        parent["buffers"] = buffers
        self.set_parent(list(idents), parent, channel)
        # Whatever an earlier request's code chose for this thread ends here.
        parent_of_output.follow_requests()
        handler = self._handlers[msg_type]
        reply = handler(parent["content"], parent)
        return None if reply is None else dumps(reply)

    # -- execute ----------------------------------------------------------

    def execute_request(self, content, parent):
        started = time.time()
        shell = self.shell
        code = content["code"]
        silent = content.get("silent", False)
        store_history = content.get("store_history", not silent)
        user_expressions = content.get("user_expressions") or {}
        self._local.allow_stdin = content.get("allow_stdin", True)
        on_main = threading.current_thread() is self._main_thread
        if not silent:
            _notebookos.publish(
                "execute_input", dumps({"code": code, "execution_count": shell.execution_count})
            )
        shell._last_traceback = None
        shell._last_traceback_during_displayhook = False
        shell.displayhook._content = None
        err = None
        # Only the main thread receives SIGINT, so only its cells are
        # interruptible. During one, SIGINT gets Python's own handler, as in
        # ipykernel: being C, it adds no frame of ours to the user's traceback.
        if on_main:
            between_cells = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            # Interrupted before it started (its SIGINT met the between-cells
            # handler): stopped as if at its first line.
            if on_main and _notebookos.take_interrupt(parent["header"]["msg_id"]):
                # Its SIGINT may still be on its way: it must meet the
                # between-cells handler, not this cell's traceback.
                signal.signal(signal.SIGINT, between_cells)
                raise KeyboardInterrupt
            result = shell.run_cell(code, store_history=store_history, silent=silent)
            if on_main:
                signal.signal(signal.SIGINT, between_cells)
            err = result.error_before_exec or result.error_in_exec
            success = result.success
        except KeyboardInterrupt as e:
            # An interrupt that landed outside the user's code (only the
            # main thread receives SIGINT); a second one must not escape
            # while its traceback is shown.
            if on_main:
                signal.signal(signal.SIGINT, between_cells)
            shell.showtraceback()
            err, success = e, False
        finally:
            if on_main:
                signal.signal(signal.SIGINT, between_cells)
                # One that arrived while the cell ran did its work there.
                _notebookos.take_interrupt("")
        # As ipykernel does before its reply: what forked children wrote
        # while the cell ran (their pipe's reader thread may not have run
        # yet) belongs to this cell, ahead of its reply and idle.
        from .shell import _flush_std

        _flush_std()
        reply = {"execution_count": shell.execution_count - 1}
        # A result whose repr raised shows a traceback and fails the cell, as
        # in ipykernel (whose reply then names no exception either).
        if success and not shell._last_traceback_during_displayhook:
            reply["status"] = "ok"
            reply["user_expressions"] = shell.user_expressions(user_expressions)
        else:
            reply["status"] = "error"
            reply["ename"] = type(err).__name__
            reply["evalue"] = str(err)
            reply["traceback"] = shell._last_traceback or []
            reply["user_expressions"] = {}
        reply["payload"] = shell.payload_manager.read_payload()
        shell.payload_manager.clear_payload()
        if not silent:
            self.last_cell = {
                "execution_count": reply["execution_count"],
                "replica": placement.current(self.placement)["self"],
                "wait_s": placement.wait_seconds(parent["header"], started),
            }
        return reply

    def raw_input(self, prompt=""):
        return self._input(prompt, password=False)

    def getpass(self, prompt="Password: ", stream=None):
        return self._input(prompt, password=True)

    def _input(self, prompt, password):
        if not getattr(self._local, "allow_stdin", False):
            from IPython.core.error import StdinNotImplementedError

            raise StdinNotImplementedError(
                "raw_input was called, but this frontend does not support input requests."
            )
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            value = _notebookos.input_request(str(prompt), bool(password))
        except KeyboardInterrupt:
            # ipykernel's words, without the frames of the wait.
            raise KeyboardInterrupt("Interrupted by user") from None
        if value == "\x04":
            raise EOFError
        return value

    # -- introspection ----------------------------------------------------

    def complete_request(self, content, parent):
        from IPython.core.completer import provisionalcompleter, rectify_completions

        code = content["code"]
        cursor_pos = content.get("cursor_pos")
        if cursor_pos is None:
            cursor_pos = len(code)
        with provisionalcompleter():
            raw = self.shell.Completer.completions(code, cursor_pos)
            completions = list(rectify_completions(code, raw))
        typed = [
            {"start": c.start, "end": c.end, "text": c.text, "type": c.type,
             "signature": c.signature}
            for c in completions
        ]
        if completions:
            start, end = completions[0].start, completions[0].end
        else:
            start = end = cursor_pos
        return {
            "status": "ok",
            "matches": [c.text for c in completions],
            "cursor_start": start,
            "cursor_end": end,
            "metadata": {"_jupyter_types_experimental": typed},
        }

    def inspect_request(self, content, parent):
        from IPython.utils.tokenutil import token_at_cursor

        code = content["code"]
        cursor_pos = content.get("cursor_pos")
        if cursor_pos is None:
            cursor_pos = len(code)
        name = token_at_cursor(code, cursor_pos)
        reply = {"status": "ok", "data": {}, "metadata": {}, "found": False}
        try:
            bundle = self.shell.object_inspect_mime(name, detail_level=content.get("detail_level", 0))
            reply["data"].update(bundle)
            if not self.shell.enable_html_pager:
                reply["data"].pop("text/html", None)
            reply["found"] = True
        except KeyError:
            pass
        return reply

    def is_complete_request(self, content, parent):
        status, indent = self.shell.input_transformer_manager.check_complete(content["code"])
        reply = {"status": status}
        if status == "incomplete":
            reply["indent"] = " " * (indent or 0)
        return reply

    def history_request(self, content, parent):
        hm = self.shell.history_manager
        kind = content.get("hist_access_type")
        raw = content.get("raw", True)
        output = content.get("output", False)
        if kind == "tail":
            hist = hm.get_tail(content.get("n") or 10, raw=raw, output=output, include_latest=True)
        elif kind == "range":
            hist = hm.get_range(content.get("session") or 0, content.get("start") or 1,
                                content.get("stop"), raw=raw, output=output)
        elif kind == "search":
            hist = hm.search(content.get("pattern") or "*", raw=raw, output=output,
                             n=content.get("n"), unique=content.get("unique", False))
        else:
            hist = []
        # IPython numbers the running session 0 in ranges; clients compare
        # with the session number that tail and search report.
        current = hm.session_number
        return {"status": "ok", "history": [[h[0] or current, *h[1:]] for h in hist]}

    # -- comms ------------------------------------------------------------

    def comm_info_request(self, content, parent):
        target = content.get("target_name")
        comms = {
            cid: {"target_name": c.target_name}
            for cid, c in self.comm_manager.comms.items()
            if target is None or c.target_name == target
        }
        return {"status": "ok", "comms": comms}

    def comm_open(self, content, parent):
        self.comm_manager.comm_open(None, None, parent)

    def comm_msg(self, content, parent):
        self.comm_manager.comm_msg(None, None, parent)

    def comm_close(self, content, parent):
        self.comm_manager.comm_close(None, None, parent)

    # -- replicas -----------------------------------------------------------
    # Called by Rust on the replica's main Python thread (see replica/statesync.rs).

    @property
    def statesync(self):
        sync = getattr(self, "_statesync", None)
        if sync is None:
            from .statesync import StateSync

            sync = self._statesync = StateSync(self.shell)
        return sync

    @_quiet
    def sync_capture(self, code):
        """After a cell ran here: its namespace changes, as (header, buffers)."""
        # Runs after the cell's reply: nothing here may print into the cell.
        # What could not be pickled is listed by %notebookos and logged.
        from . import gpu

        gpu.register(self.shell)
        from .statesync import owns_its_pages

        header, buffers = self.statesync.capture(code)
        skipped = self.statesync.unpicklable
        if skipped:
            names = ", ".join(f"{name} ({why})" for name, why in skipped)
            _log.info("not replicated, lost if this replica fails: %s", names)
        # Whether the kernel may back each buffer with the delta's own pages.
        alone = _only_kernel_threads()
        return header, list(buffers), [alone and owns_its_pages(b) for b in buffers]

    @_quiet
    def sync_apply(self, header, buffers):
        self.statesync.apply(header, buffers)

    @_quiet
    def sync_checkpoint(self):
        header, buffers = self.statesync.checkpoint()
        return header, list(buffers), [False] * len(buffers)

    @_quiet
    def sync_restore(self, header, buffers):
        self.statesync.restore(header, buffers)

    @_quiet
    def sync_digest(self):
        """Per-name value digests, as JSON (what `%notebookos verify` compares)."""
        return json.dumps(self.statesync.name_digests())

    @_quiet
    def gpu_bind(self, gpus, fake):
        from . import gpu

        return gpu.bind(self.shell, list(gpus), bool(fake))

    @_quiet
    def gpu_unbind(self):
        from . import gpu

        return gpu.unbind(self.shell)

    # -- lifecycle --------------------------------------------------------

    def shutdown_request(self, content, parent):
        shell = self.shell
        try:
            shell.history_manager.end_session()
        except Exception:
            pass
        try:
            import atexit

            atexit._run_exitfuncs()
        except Exception:
            pass
        return {"status": "ok", "restart": bool(content.get("restart", False))}


def _ignore_sigint(signum, frame):
    # Between cells an interrupt means nothing.
    pass


def _config_from_argv(argv):
    """``--Class.trait=value`` options as a traitlets Config, as ipykernel accepts them."""
    from traitlets.config import Config

    config = Config()
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            continue
        key, _, value = arg[2:].partition("=")
        if "." not in key:
            continue
        section, _, trait = key.rpartition(".")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        target = config
        for part in section.split("."):
            target = target[part]
        target[trait] = value
    return config


def start(options):
    """Builds the shell and the kernel object; called once by Rust."""
    options = json.loads(options)
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    from .iostream import OutStream

    sys.stdout = OutStream("stdout", 1)
    sys.stderr = OutStream("stderr", 2)
    # As under ipykernel: modules next to the notebook import (the kernel
    # runs in the notebook's directory).
    if "" not in sys.path:
        sys.path.insert(0, "")

    from . import comm as rust_comm
    from .shell import NotebookosShell

    comm_manager = rust_comm.install()
    config = _config_from_argv(options.get("argv", []))
    shell = NotebookosShell.instance(config=config)
    kernel = Kernel(shell, comm_manager, options.get("connection_file"))
    shell.kernel = kernel
    # matplotlib_inline is not imported here (it imports matplotlib, 0.4 s
    # of start-up): as under ipykernel, its backend registers InlineBackend
    # with the shell when a cell first imports matplotlib.
    builtins.input = kernel.raw_input
    getpass.getpass = kernel.getpass
    _interruptible_pdb()
    signal.signal(signal.SIGINT, _ignore_sigint)
    if options.get("idle_wakeup_fd") is not None:
        from .asyncloop import IdleLoop

        kernel.idle_loop = IdleLoop(
            options["idle_wakeup_fd"], lambda: kernel.get_parent("shell"), kernel.serve_comms
        )
        kernel.idle_loop.loop()
    wakeup_fd = options.get("sigint_wakeup_fd")
    if wakeup_fd is not None:
        # Rust forwards interrupts to a cell running on another replica.
        signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False)
    return kernel


def _interruptible_pdb():
    """As under ipykernel: an interrupt ends a pdb session (IPython's pdb
    prints it and the cell goes on) instead of leaving the kernel in it."""
    import pdb

    from IPython.core import debugger

    if hasattr(debugger, "InterruptiblePdb"):
        debugger.Pdb = debugger.InterruptiblePdb
        pdb.Pdb = debugger.Pdb
        pdb.set_trace = debugger.set_trace


def _only_kernel_threads():
    """Whether no thread but the kernel's own runs here: then nothing can write
    to an array between its copy into a delta and the swap of its pages."""
    from IPython.core.history import HistorySavingThread

    me = threading.current_thread()
    return all(
        t is me or isinstance(t, HistorySavingThread) or t.name.startswith("notebookos-")
        for t in threading.enumerate()
    )
