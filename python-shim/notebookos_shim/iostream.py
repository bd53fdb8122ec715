"""sys.stdout / sys.stderr that stream to the front-end.

Batching into stream messages (one per print, flushed at least every
0.2 s) happens in Rust, so writes here are cheap and ordered with every
other output.

A child forked from the kernel (multiprocessing, DataLoader workers) has
no Rust threads to hand its output to: it writes into a pipe instead, and
a thread of the kernel streams what arrives to the cell running then, as
ipykernel forwards its children's output.
"""

import io
import os
import select
import struct
import threading

import _notebookos

from . import parent


class _ChildPipe:
    """One stream's pipe from forked children to the kernel.

    A write to a pipe is atomic only up to PIPE_BUF bytes, so children send
    frames no larger (pid, length, last) and the kernel puts each write back
    together before streaming it. A child sends whole lines (the rest when
    it flushes, as it does on exit), since one print is several writes: two
    children's lines never interleave, however long.
    """

    _HEADER = struct.Struct("=iIB")
    _PAYLOAD = select.PIPE_BUF - _HEADER.size

    def __init__(self, name):
        self.name = name
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self._buffer = b""
        self._partial = {}
        # In a child: what it wrote after its last newline (per pid, as a
        # child's child starts with a copy of this).
        self._line_pid, self._line = None, ""
        # Held while reading and streaming (the kernel's own writes too), so
        # that what drain() takes and what the thread takes go out in the
        # order written, and never inside a line the kernel is printing: one
        # print is several writes. Reentrant: a signal handler may print.
        self._lock = threading.RLock()
        self._held = ""
        self._kernel_mid_line = False
        threading.Thread(target=self._forward, name=f"notebookos-child-{name}",
                         daemon=True).start()

    def _forward(self):
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN)
        while True:
            poller.poll()
            self.drain()

    def drain(self, force=False):
        """Streams every write the children have completed so far; unless
        ``force``, not while the kernel's own line is unfinished (it follows
        that line)."""
        with self._lock:
            while True:
                try:
                    data = os.read(self.read_fd, 65536)
                except BlockingIOError:
                    break
                if not data:
                    break
                self._buffer += data
            done = []
            header, buffer, at = self._HEADER, self._buffer, 0
            while len(buffer) - at >= header.size:
                pid, length, last = header.unpack_from(buffer, at)
                end = at + header.size + length
                if len(buffer) < end:
                    break
                self._partial.setdefault(pid, []).append(buffer[at + header.size:end])
                at = end
                if last:
                    done.append(b"".join(self._partial.pop(pid)))
            self._buffer = buffer[at:]
            self._held += b"".join(done).decode("utf-8", "replace")
            if force:
                self._kernel_mid_line = False
            self._release_held()

    def kernel_write(self, text, explicit):
        """The kernel's own write (see ``_lock``)."""
        with self._lock:
            _notebookos.stream(self.name, text, explicit)
            self._kernel_mid_line = not text.endswith("\n")
            self._release_held()

    def _release_held(self):
        if self._held and not self._kernel_mid_line:
            text, self._held = self._held, ""
            _notebookos.stream(self.name, text)

    def write(self, text):
        pid = os.getpid()
        if self._line_pid != pid:
            self._line_pid, self._line = pid, ""
        self._line += text
        cut = self._line.rfind("\n") + 1
        if cut:
            whole, self._line = self._line[:cut], self._line[cut:]
            self._send(whole)

    def flush_child(self):
        """In a child: sends what it wrote after its last newline."""
        if self._line_pid == os.getpid() and self._line:
            rest, self._line = self._line, ""
            self._send(rest)

    def _send(self, text):
        data = text.encode("utf-8", "replace")
        pid = os.getpid()
        for start in range(0, len(data), self._PAYLOAD):
            chunk = data[start:start + self._PAYLOAD]
            last = start + self._PAYLOAD >= len(data)
            frame = self._HEADER.pack(pid, len(chunk), last) + chunk
            while frame:
                frame = frame[os.write(self.write_fd, frame):]


class OutStream(io.TextIOBase):
    def __init__(self, name, fd):
        super().__init__()
        self.name = name
        self._fd = fd
        self._master_pid = os.getpid()
        self._children = _ChildPipe(name)

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
        # Processes started with exec and C code writing to the fd reach the
        # kernel's own stdout/stderr, as with ipykernel without fd capture.
        return self._fd

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if s:
            if os.getpid() == self._master_pid:
                self._children.kernel_write(s, parent.explicit())
            else:
                self._children.write(s)
        return len(s)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        if os.getpid() == self._master_pid:
            # What children wrote before the cell ends belongs to the cell.
            self._children.drain(force=True)
            _notebookos.flush()
        else:
            self._children.flush_child()
