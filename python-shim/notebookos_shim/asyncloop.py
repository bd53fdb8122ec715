"""The shell's asyncio loop, run between requests as ipykernel's always runs.

A cell's ``asyncio.get_event_loop()`` and its top-level ``await`` both get
IPython's loop. Tasks they schedule go on running while the kernel waits for
the next request (Rust rings an eventfd to stop the loop when one comes),
and what a task prints goes to the cell that scheduled it, as under
ipykernel, whose parent is a context variable tasks inherit. While a cell
runs the loop (top-level ``await``), the same ring serves comm messages
inside it, so a cell can await a widget's answer.
"""

import asyncio
import contextvars
import os
import sys

from IPython.core.async_helpers import get_asyncio_loop

from . import parent


class IdleLoop:
    def __init__(self, wakeup_fd, current_request, serve_comms):
        self._fd = wakeup_fd
        self._current_request = current_request
        self._serve_comms = serve_comms
        self._prepared = None
        self._idling = False

    def loop(self):
        """IPython's loop (a new one if a cell closed it), made the main
        thread's current loop again (``asyncio.run`` in a cell unsets it)."""
        loop = get_asyncio_loop()
        asyncio.set_event_loop(loop)
        if loop is not self._prepared:
            loop.set_task_factory(self._task)
            loop.add_reader(self._fd, self._woken, loop)
            self._prepared = loop
        return loop

    def run(self):
        """Runs the loop until Rust has a request for this thread."""
        loop = self.loop()
        if loop.is_running():
            return False
        self._idling = True
        try:
            loop.run_forever()
        except BaseException as e:  # noqa: BLE001 - a task's SystemExit must not end the kernel
            print(f"notebookos: the asyncio loop stopped: {e!r}", file=sys.__stderr__)
        finally:
            self._idling = False
        return True

    def _woken(self, loop):
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass
        if self._idling:
            loop.stop()
        else:
            self._serve_comms()

    def _task(self, loop, coro, **kwargs):
        context = kwargs.pop("context", None) or contextvars.copy_context()
        if context.run(parent.explicit) is None:
            context.run(parent.set_explicit, self._current_request())
        # The task copies the context it is made in (Python 3.10 takes no
        # `context` argument).
        return context.run(asyncio.Task, coro, loop=loop, **kwargs)
