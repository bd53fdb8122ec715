"""sys.stdout / sys.stderr that stream to the front-end.

Batching into stream messages (one per print, flushed at least every
0.2 s) happens in Rust, so writes here are cheap and ordered with every
other output.
"""

import io
import os

import _notebookos


class OutStream(io.TextIOBase):
    def __init__(self, name, fd):
        super().__init__()
        self.name = name
        self._fd = fd
        self._master_pid = os.getpid()

    def _is_master_process(self):
        # ipykernel's: False in a child forked from the kernel (multiprocessing).
        return os.getpid() == self._master_pid

    @property
    def encoding(self):
        return "UTF-8"

    @property
    def errors(self):
        return "strict"

    def writable(self):
        return True

    def isatty(self):
        return False

    def fileno(self):
        # Child processes and C code writing to the fd reach the kernel's
        # own stdout/stderr, as with ipykernel without fd capture.
        return self._fd

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if s:
            _notebookos.stream(self.name, s)
        return len(s)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        _notebookos.flush()
