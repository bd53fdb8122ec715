"""Which request a thread's output answers.

Output goes to the request being handled (the cell running now) unless the
code that prints said otherwise, as ipykernel lets it: `set_thread_parent`
(this thread, until reset) or `set_parent` from a thread the user started.
A cell that starts a thread and passes it `get_ipython().get_parent()`
thereby keeps that thread's prints in its own output, whichever cell runs
when they happen. The choice is a context variable, so it is per thread and
copied into asyncio tasks, and holds the header already serialised: a
print costs nothing extra while none is set.
"""

import contextvars

from .jsonutil import dumps

_explicit = contextvars.ContextVar("notebookos_parent", default=None)


def explicit():
    """The serialised header this thread's output answers, or None."""
    return _explicit.get()


def set_explicit(parent):
    header = (parent or {}).get("header", parent) or {}
    return _explicit.set(dumps(header) if header else None)


def reset(token):
    _explicit.reset(token)


def follow_requests():
    """From here on, output answers whatever request is being handled."""
    _explicit.set(None)
