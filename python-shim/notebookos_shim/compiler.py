"""Cell file names as ipykernel gives them.

A cell's code is compiled under a file name that shows in SyntaxErrors
("invalid syntax (3573913704.py, line 14)"), in `inspect.getfile` and in
how IPython lays out a traceback's context. ipykernel names a cell
``<tmp>/ipykernel_<pid>/<murmur2 of its source>.py``; doing the same keeps
every one of those outputs identical under both kernels.
"""

import os
import tempfile

from IPython.core.compilerop import CachingCompiler

# ipykernel's seed: the same source gets the same name under both kernels.
_SEED = 0xC70F6907
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes, seed: int = _SEED) -> int:
    """MurmurHash2, 32-bit, little-endian blocks."""
    h = (seed ^ len(data)) & _MASK
    whole = len(data) - len(data) % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = data[whole:]
    if tail:
        h ^= int.from_bytes(tail, "little")
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def cell_filename(raw_code: str) -> str:
    # ipykernel lets IPYKERNEL_CELL_NAME name every cell (debuggers set it).
    name = os.environ.get("IPYKERNEL_CELL_NAME")
    if name is not None:
        return name
    folder = os.path.join(tempfile.gettempdir(), f"ipykernel_{os.getpid()}")
    return os.path.join(folder, f"{murmur2(raw_code.encode('utf-8'))}.py")


class CellCompiler(CachingCompiler):
    def get_code_name(self, raw_code, transformed_code, number):
        return cell_filename(raw_code)
