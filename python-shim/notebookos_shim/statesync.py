"""Replicating the user namespace from the replica that ran a cell to the others.

After a cell runs on the winning replica, ``StateSync.capture`` pickles what
changed in ``shell.user_ns`` (cloudpickle, protocol 5) and the other replicas
hand it to ``StateSync.apply``. Rust moves the bytes; nothing here does I/O.

Wire format: ``header`` is one pickle of a dict (see ``_payload``) whose
``"set"`` entry holds every changed value, so references shared between
names sent together stay shared. Buffers of 64 KiB or more (numpy arrays,
pandas blocks, CPU torch tensors) are protocol-5 out-of-band buffers returned
next to the header, so large arrays are never copied into it.

Besides names, every payload carries what the cell changed of the working
directory, the environment and ``sys.path`` (``process.py``).

User names are the names in ``user_ns`` that IPython does not hide, that
are not its output/input caches (``_``, ``__``, ``___``, ``_i``, ``_ii``,
``_iii``, ``_<N>``, ``_i<N>``) and are not module machinery (``__name__``,
``__builtins__`` ...). As in IPython's ``%who``, a hidden name the user
rebinds (``open = ...``) is a user name while it holds the user's value.

Change detection. Every replica keeps a baseline: per user name, the id of
its value, the size of its pickled form and a digest of that form. After a
cell, a name is re-pickled ("checked") when

* it is new or rebound (its id changed) -- it is sent whatever the hash;
* it appears as an identifier in the cell (an ``ast.Name``, which covers
  attribute bases like ``df`` in ``df.x = 1``, names inside functions the
  cell defines, and identifiers inside ``%magic`` arguments);
* a notebook function or class the cell names refers to it as a global,
  directly or through other notebook functions (``train()`` stepping the
  global ``model``; ``trainer.fit()`` whose class's methods do);
* its pickled size was below ``SMALL`` (1 MiB) last time, so in-place
  mutation through anything else (a library callback appending to a global
  list) is caught for everything cheap to re-pickle; a GPU tensor's size is
  its bytes on the GPU, so a model is not re-digested after every cell;
* it could not be pickled last time;
* it is bound to the same object as another checked name (aliases);
* it holds a torch tensor that a changed value holds too (``opt.step()``
  names only ``opt``, whose parameters are ``model``'s; a receiver learns
  which tensors its values hold as it applies them);

and is sent when its hash differs. When the cell uses dynamic namespace
access (``globals()``, ``vars()``, ``locals()``, ``exec``, ``eval``,
``%run``) or cannot be parsed even after IPython's transformer, every name
is checked.

Known limit: a large object (>= 1 MiB pickled) that is neither rebound nor
reached from the cell's names as above is assumed unchanged, so in-place
mutation of it through an alias stored elsewhere (``d = {"a": big}`` for a
numpy array, a numpy view), a function imported from a module, or ``%run -i``
style code that does not name it is not replicated. Checking
a large object costs one pickle plus a hash of its buffers (xxh3 on every core,
GIL released: several GB/s), no copy; a GPU tensor by a digest computed on the GPU
(``device_digest``), never copied to the host to be compared. Objects shared between names sent in different cells become separate
copies on the receivers.

Functions and classes defined in the notebook travel by value (cloudpickle).
Their ``__globals__`` are not pickled: on the receiver they are bound to the
receiver's own ``user_ns``, so they see (and ``global`` statements change)
the replicated namespace exactly as on the winner. A value that can no
longer be pickled (``x = open(...)`` over a replicated ``x``) is deleted on
the receivers rather than left stale.

The buffers ``capture`` returns are views of live objects: send them
before the next cell runs and drop them (while a view exists, the array
it views cannot be resized in place: ``ndarray.resize`` raises).

``apply``/``restore`` unpickle everything before they touch ``user_ns``,
so a delta that fails to load changes nothing there -- with one exception
that is harmless: cloudpickle re-sets the attributes of a notebook class
this process already has (from an earlier delta) to the equal ones in the
header as it loads. Unpickling runs code from the header: replicas must
trust each other.

Jupyter widgets keep one object per process and model id: see ``widgets``.
"""

import ast
import functools
import hashlib
import io
import pickle
import re
import sys
import types

import cloudpickle

from . import process, widgets

SMALL = 1 << 20  # pickled size below which a value is re-checked after every cell
OUT_OF_BAND = 64 << 10  # buffers at least this big travel next to the header
FORMAT = "notebookos-statesync/2"

_CACHE_NAME = re.compile(r"_(_{1,2}|i{1,3}|i?\d+)?\Z")
_MODULE_NAMES = frozenset(
    {"__name__", "__doc__", "__package__", "__loader__", "__spec__", "__file__",
     "__cached__", "__path__", "__builtin__", "__builtins__"}
)
# Code using these can change any name without naming it.
_DYNAMIC = frozenset({"globals", "locals", "vars", "exec", "eval"})
_MAGIC_CALLS = frozenset({"run_line_magic", "run_cell_magic"})
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_KIND_REASONS = {
    "generator": "generator", "async_generator": "generator", "coroutine": "coroutine",
    "lock": "lock", "RLock": "lock", "socket": "socket", "frame": "frame",
}


class _Unpicklable(TypeError):
    pass


def _user_namespace():
    """Stands in a pickle for the receiving replica's ``user_ns``; the
    unpickler resolves it, so it is never called."""
    raise RuntimeError("statesync: _user_namespace is resolved by the unpickler")


class _UserNamespace:
    def __reduce__(self):
        return (_user_namespace, ())


_USER_NS = _UserNamespace()
_MISSING = object()

_STREAMS = ("stdout", "stderr", "stdin", "__stdout__", "__stderr__")
_SHELL_PARTS = ("kernel", "display_pub", "displayhook", "display_formatter", "history_manager",
                "payload_manager", "events", "magics_manager", "extension_manager",
                "builtin_trap", "display_trap", "compile")
_KERNEL_PARTS = ("session", "iopub_socket", "comm_manager")
_shell_parts = None


def _shell_objects():
    """The shell and what hangs off it (the kernel, its session and sockets,
    the display and history machinery), by name: made once with the shell,
    they live as long as the process, so the table is built once."""
    global _shell_parts
    if _shell_parts is None:
        from IPython.core.getipython import get_ipython

        shell = get_ipython()
        if shell is None:
            return {}
        found = {"shell": shell}
        found.update((a, getattr(shell, a, None)) for a in _SHELL_PARTS)
        kernel = found["kernel"]
        found.update(("kernel." + a, getattr(kernel, a, None)) for a in _KERNEL_PARTS)
        by_name = {name: v for name, v in found.items() if v is not None}
        _shell_parts = (by_name, {id(v): name for name, v in by_name.items()})
    return _shell_parts[0]


def _process_local_name(obj):
    """The name under which `obj` travels if every replica has its own (the
    shell's objects, the standard streams, which a cell may swap), else None.
    A value holding one (``ip = get_ipython()``, an object keeping
    ``sys.stdout``) is bound to the receiving replica's own."""
    _shell_objects()
    if _shell_parts is not None and id(obj) in _shell_parts[1]:
        return _shell_parts[1][id(obj)]
    for stream in _STREAMS:
        if getattr(sys, stream) is obj:
            return stream
    return None


def _process_local(name):
    """Unpickling: this replica's own object of that name."""
    if name in _STREAMS:
        return getattr(sys, name)
    try:
        return _shell_objects()[name]
    except KeyError:
        raise pickle.UnpicklingError(f"statesync: no process-local object {name!r}") from None


class _Pickler(cloudpickle.Pickler):
    """cloudpickle that leaves the notebook's globals out of its functions."""

    def __init__(self, file, user_ns, buffer_callback=None):
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self._user_ns = user_ns

    def _dynamic_function_reduce(self, func):
        reduced = super()._dynamic_function_reduce(func)
        if func.__globals__ is not self._user_ns:
            return reduced
        # cloudpickle would copy the referenced globals into a private dict;
        # the receiver's namespace already holds them (they are replicated).
        make, (code, _, name, defaults, closure), (state, slots), *rest = reduced
        slots = dict(slots, __globals__={})
        return (make, (code, _USER_NS, name, defaults, closure), (state, slots), *rest)

    def _picklable(self, obj):
        try:
            _dump(obj, self._user_ns, lambda _buf: False)  # buffers by reference: no copy
        except Exception:
            return False
        return True

    def reducer_override(self, obj):
        local = _process_local_name(obj)
        if local is not None:
            return (_process_local, (local,))
        # cloudpickle would send a file opened for reading as a StringIO of
        # its contents: not the same object, so report it instead.
        if isinstance(obj, io.IOBase) and not isinstance(obj, (io.StringIO, io.BytesIO)):
            raise _Unpicklable("closed file" if obj.closed else "open file")
        if isinstance(obj, functools._lru_cache_wrapper):
            # Pickled by name as `__main__.<name>`, which a replica receiving
            # the function for the first time cannot resolve: send the wrapped
            # function and wrap it again there (with an empty cache).
            params = obj.cache_parameters()
            return (_lru_cached, (obj.__wrapped__, params["maxsize"], params["typed"]))
        if _by_name_in_notebook(obj):
            raise _Unpicklable("pickled by name from the notebook, not by value")
        widget = widgets.reduce(obj, self._picklable)
        if widget is not None:
            return widget
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            reduced = _tensor_reduce(torch, obj)
            if reduced is not None:
                return reduced
        return super().reducer_override(obj)


def _device_copies_done():
    """Waits for the device-to-host copies a pickle queued (see _on_host)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def namespace_digest(name_digests):
    """One digest over every name and its value digest."""
    h = hashlib.sha256()
    for name, digest in sorted(name_digests.items()):
        h.update(f"{name}\0{digest}\0".encode())
    return h.hexdigest()


def _lru_cached(func, maxsize, typed):
    return functools.lru_cache(maxsize=maxsize, typed=typed)(func)


def _by_name_in_notebook(obj):
    """Callables other than functions and classes (which cloudpickle sends by
    value) that pickle as a reference to a notebook name: decorator wrappers
    such as functools.cache objects or numba dispatchers."""
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return False
    if not callable(obj) or getattr(obj, "__module__", None) != "__main__":
        return False
    try:
        return isinstance(obj.__reduce_ex__(5), str)
    except Exception:
        return False


def _tensor_reduce(torch, tensor):
    """A dense tensor through numpy, so its data can travel out-of-band
    (torch's own pickling copies the storage into the pickle); None to
    leave it to torch. A GPU tensor travels as a host copy (its state stays
    on this replica's GPU; the receivers' is on the host until a GPU cell
    there moves it, see gpu.py)."""
    # A non-leaf travels as its data (its graph cannot), as torch's own pickle does;
    # never as a GPU tensor, which would make the receiver take GPU memory.
    if (tensor.device.type not in ("cpu", "cuda") or tensor.layout != torch.strided
            or tensor.is_quantized):
        return None
    if type(tensor) is torch.nn.Parameter:
        return (torch.nn.Parameter, (_on_host(torch, tensor), tensor.requires_grad))
    if type(tensor) is not torch.Tensor:
        return None
    if tensor.device.type == "cuda":
        tensor = _on_host(torch, tensor).requires_grad_(tensor.requires_grad)
    if tensor.requires_grad:
        return (torch.Tensor.requires_grad_, (tensor.detach(),))
    try:
        return (torch.from_numpy, (tensor.numpy(),))
    except TypeError:  # no numpy dtype (bfloat16 ...): travel as integers
        same_size = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        as_int = same_size.get(tensor.element_size())
        return None if as_int is None else (torch.Tensor.view, (tensor.view(as_int), tensor.dtype))
    except RuntimeError:  # conjugate or negative views
        return None


def _on_host(torch, tensor):
    """The tensor's data on the host: itself on CPU, else a copy into pinned
    memory (the fast path over PCIe), queued on the current stream; capture
    synchronizes before the bytes are read. The copy is kept as the tensor's
    host mirror (see gpu.py): moving the state off the GPU later costs no
    copy while the tensor is unchanged."""
    t = tensor.detach()
    if t.device.type == "cpu":
        return t
    from . import gpu

    digest = device_digest(torch, t)
    mirror = gpu.host_mirror(tensor, digest)
    if mirror is not None:
        return mirror
    try:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    except RuntimeError:
        return t.to("cpu")
    host.copy_(t, non_blocking=True)
    gpu.keep_host_mirror(tensor, digest, host)
    return host


def _same_class_form(obj, reduced):
    """A notebook class's reduction with what does not make it a different
    class left out, so it pickles alike in any process and before and after
    an instance of it was pickled."""
    if not (isinstance(obj, type) and isinstance(reduced, tuple) and len(reduced) > 2):
        return reduced
    make, args, state, *rest = reduced
    if isinstance(args, tuple) and len(args) == 6:
        # (metaclass, name, bases, type kwargs, tracker id, None): the tracker
        # id is random per class and process.
        args = (*args[:4], None, args[5])
    if isinstance(state, tuple) and state and isinstance(state[0], dict):
        # Attribute order follows how the class was built here; __module__
        # travels in the type kwargs too; the __slotnames__ cache exists only
        # once this process pickled an instance.
        skip = ("__slotnames__", "__module__")
        clsdict = {k: v for k, v in sorted(state[0].items()) if k not in skip}
        state = (clsdict, *state[1:])
    return (make, args, state, *rest)


class _CanonicalPickler(_Pickler):
    """The form ``digest`` hashes, the same for equal values in any process:
    sets in sorted order (their order follows the process's string hash
    seed), numpy dtypes by name, unmemoized (whether two arrays share a
    dtype object does not survive a pickle round trip), strings by value
    (never as a reference to an equal one seen before), and notebook classes
    in their same form (``_same_class_form``)."""

    def reducer_override(self, obj):
        return _same_class_form(obj, super().reducer_override(obj))

    def persistent_id(self, obj):
        if type(obj) is str:
            # By value every time: whether two equal strings are one object (and so
            # pickled once, then referenced) differs between processes.
            return b"s" + obj.encode("utf-8", "surrogatepass")
        if type(obj) in (set, frozenset):
            return (type(obj).__name__, sorted(_value_digest(e, self._user_ns) for e in obj))
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(obj, numpy.dtype):
            return ("numpy.dtype", repr(obj))
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, user_ns, buffers):
        super().__init__(file, buffers=buffers)
        self._user_ns = user_ns

    def find_class(self, module, name):
        if module == __name__ and name == "_user_namespace":
            return lambda: self._user_ns
        return super().find_class(module, name)


def _dump(obj, user_ns, buffer_callback=None, pickler=_Pickler):
    return _dump_with(obj, user_ns, buffer_callback, pickler)[0]


def _dump_with(obj, user_ns, buffer_callback, pickler):
    """The pickle, and the pickler that made it."""
    f = io.BytesIO()
    p = pickler(f, user_ns, buffer_callback=buffer_callback)
    p.dump(obj)
    return f.getvalue(), p


class _ChangePickler(_Pickler):
    """What change detection pickles: a GPU tensor as its layout and a digest
    of its contents computed on the GPU (see ``device_digest``), so a model is
    never copied to the host just to learn it did not change. Never unpickled.
    (Version counters would be cheaper but are not bumped by fused or foreach
    optimizer steps.) CPU tensors are hashed as bytes, like any buffer; notebook
    classes in their same form, so that pickling an instance (which caches
    ``__slotnames__`` on its class) does not make the class look changed."""

    def __init__(self, file, user_ns, buffer_callback=None):
        super().__init__(file, user_ns, buffer_callback)
        # What the tokens stand for: a model is as large as its weights, so that
        # it is re-checked only when a cell may have changed it (see ``_stale``).
        self.device_bytes = 0
        # The tensors the value holds (by id): a change to one shows in every
        # name that holds it (see ``StateSync._check``).
        self.tensors = set()

    def reducer_override(self, obj):
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            self.tensors.add(id(obj))
            if obj.is_cuda:
                digest = device_digest(torch, obj)
                if digest is not None:
                    self.device_bytes += digest[0]
                    token = (type(obj).__qualname__, str(obj.device), str(obj.dtype),
                             tuple(obj.shape), obj.requires_grad, digest)
                    return (_tensor_token, token)
        return _same_class_form(obj, super().reducer_override(obj))


class _TensorFinder(_Pickler):
    """Walks a value as a pickle would, only to learn which tensors it holds,
    copying and reading none of their data (a receiver learns this of the
    values a delta brought)."""

    def __init__(self, user_ns):
        super().__init__(_Discard(), user_ns, buffer_callback=lambda _buf: False)
        self.tensors = set()

    def reducer_override(self, obj):
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            self.tensors.add(id(obj))
            return (_tensor_token, ())
        return super().reducer_override(obj)


class _Discard:
    def write(self, data):
        return len(data)


def _tensors_of(value, user_ns):
    """The ids of the tensors a value holds; empty where torch is not loaded."""
    if "torch" not in sys.modules:
        return frozenset()
    finder = _TensorFinder(user_ns)
    try:
        finder.dump(value)
    except Exception:
        pass  # what was found before the failure still counts
    return frozenset(finder.tensors)


def _tensor_token(*token):
    raise RuntimeError("statesync: a change-detection token is never unpickled")


_DIGEST_GROUP = 1 << 22  # words reduced at a time: bounds the temporary GPU memory
_WEIGHTS = {}


def device_digest(torch, t):
    """Two wrapping 64-bit sums over the tensor's 32-bit words (plain, and
    weighted by a fixed pseudo-random sequence, so moved or swapped words
    show), computed on its GPU: milliseconds for gigabytes, one small copy
    back. None when the tensor cannot be viewed as words."""
    try:
        flat = t.detach().contiguous().reshape(-1)
        if flat.numel() == 0:
            return (0, 0, 0)
        nbytes = flat.numel() * flat.element_size()
        raw = flat.view(torch.uint8)
        try:
            words = raw.view(torch.int32)
        except RuntimeError:  # a size or offset that is not a whole number of words
            words = raw
        weights = _WEIGHTS.get(t.device)
        if weights is None:
            g = torch.Generator(device=t.device).manual_seed(0x6E626F73)
            weights = torch.randint(1, 1 << 31, (_DIGEST_GROUP,), generator=g,
                                    device=t.device, dtype=torch.int32)
            _WEIGHTS[t.device] = weights
        sums = []
        for at in range(0, words.numel(), _DIGEST_GROUP):
            part = words[at:at + _DIGEST_GROUP].to(torch.int64)
            sums.append(torch.stack([part.sum(), (part * weights[:part.numel()]).sum()]))
        total = torch.stack(sums).sum(dim=0).tolist()
        return (nbytes, *total)
    except (RuntimeError, TypeError):
        return None


def _hash_parts(parts):
    """The digest of byte buffers' concatenation: xxh3 in Rust, on every core,
    with the GIL released; hashlib where the kernel's module is absent (the
    shim's own unit tests)."""
    try:
        import _notebookos
    except ImportError:
        h = hashlib.blake2b(digest_size=16)
        for p in parts:
            h.update(p)
        return h.digest()
    return _notebookos.digest_buffers(parts)


def _fingerprint(value, user_ns, pickler=_ChangePickler):
    """(pickled size, digest, ids of the tensors it holds) of a value, hashing
    its buffers in place."""
    views = []

    def keep(buf):
        try:
            views.append(buf.raw())
        except BufferError:  # not contiguous: pickle copies it in-band
            return True
        return False

    inband, used = _dump_with(value, user_ns, keep, pickler)
    _device_copies_done()
    size = len(inband) + sum(v.nbytes for v in views) + getattr(used, "device_bytes", 0)
    return size, _hash_parts([inband, *views]), frozenset(getattr(used, "tensors", ()))


def _value_digest(value, user_ns):
    return _fingerprint(value, user_ns, _CanonicalPickler)[1]


def _reason(exc):
    if isinstance(exc, _Unpicklable):
        return str(exc)
    m = re.search(r"cannot pickle '([\w.]+)' object", str(exc))
    if m:
        kind = m.group(1).rsplit(".", 1)[-1]
        return _KIND_REASONS.get(kind, f"cannot pickle {m.group(1)}")
    if isinstance(exc, RecursionError):
        return "too deeply nested"
    return f"{type(exc).__name__}: {exc}"[:200]


def _mentioned_names(code, shell):
    """Identifiers the cell mentions, or None when it may change any name."""
    if not code:
        return set()
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        try:
            tree = ast.parse(shell.transform_cell(code))
        except Exception:
            return None
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in _MAGIC_CALLS):
            args = [a.value for a in node.args
                    if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if args[:1] == ["run"]:
                return None
            for arg in args[1:]:
                names.update(_IDENTIFIER.findall(arg))
    return None if names & _DYNAMIC else names


def _reached_names(mentioned, names, user_ns):
    """``mentioned`` and, transitively, the global names that the notebook's
    functions and classes among them refer to (``train()`` may change the
    ``model`` it reads as a global without the cell naming it); None, as for a
    cell using ``globals()``, when that cannot be told."""
    reached, todo, seen = set(), list(mentioned), set()
    try:
        while todo:
            name = todo.pop()
            if name in reached:
                continue
            reached.add(name)
            if name not in names:
                continue
            codes = _notebook_code(names[name], user_ns)
            if codes is None:
                return None
            for code in codes:
                found = _code_names(code, seen)
                if found & _DYNAMIC:
                    return None
                todo.extend(n for n in found if n in names and n not in reached)
    except Exception:  # a value whose type or attributes raise: check everything
        return None
    return reached


_WALK_LIMIT = 10_000  # objects looked at per name before giving up (check everything)


def _notebook_code(value, user_ns):
    """The code objects of the notebook functions a value is or holds: a
    function defined in the notebook, what it wraps or closes over (a
    decorator's wrapper), a method, partial or cache of one, and the methods
    of a notebook class, of an instance's, and of a bound method's object.
    None past ``_WALK_LIMIT`` objects. Types are read with ``type()``, never
    ``isinstance``, which would ask a proxy's ``__class__``."""
    pending, seen, out = [value], set(), []
    while pending:
        if len(seen) >= _WALK_LIMIT:
            return None
        v = pending.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        kind = type(v)
        if kind is types.FunctionType:
            if v.__globals__ is user_ns:
                out.append(v.__code__)
            pending.extend(c.cell_contents for c in v.__closure__ or () if _filled(c))
            pending.extend(w for w in (v.__dict__.get("__wrapped__"),) if w is not None)
        elif kind is types.MethodType:
            pending.extend((v.__func__, type(v.__self__)))
        elif kind in (staticmethod, classmethod):
            pending.append(v.__func__)
        elif kind is functools.partial:
            pending.append(v.func)
        elif kind is functools._lru_cache_wrapper:
            pending.append(v.__wrapped__)
        elif kind is property:
            pending.extend(f for f in (v.fget, v.fset, v.fdel) if f is not None)
        elif kind is functools.cached_property:
            pending.append(v.func)
        else:
            classes = (v, kind) if issubclass(kind, type) else (kind,)
            for cls in classes:
                for klass in type.__dict__["__mro__"].__get__(cls):
                    members = type.__dict__["__dict__"].__get__(klass)
                    if members.get("__module__") == "__main__":
                        pending.extend(m for m in members.values() if type(m) in _METHODS)
    return out


def _filled(cell):
    try:
        cell.cell_contents
    except ValueError:  # a cell not bound yet
        return False
    return True


_METHODS = frozenset({types.FunctionType, staticmethod, classmethod, property, functools.partial,
                      functools._lru_cache_wrapper, functools.cached_property})


def _code_names(code, seen):
    """The global names a code object and those nested in it may read or bind
    (``co_names`` also holds attribute names: more names checked, never fewer)."""
    if code in seen:
        return set()
    seen.add(code)
    found = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _code_names(const, seen)
    return found


class _Entry:
    """What the baseline knows about a name: ``digest`` None = not replicated;
    ``tensors``, the ids of the tensors its value holds (None: not looked at
    yet, see ``StateSync._tensors_held``)."""

    __slots__ = ("oid", "size", "digest", "tensors")

    def __init__(self, oid, size, digest, tensors=frozenset()):
        self.oid, self.size, self.digest, self.tensors = oid, size, digest, tensors


class StateSync:
    """Captures and applies namespace deltas for one replica's shell."""

    def __init__(self, shell):
        self.shell = shell
        # The namespace at start-up is taken to be the same on every replica.
        names = self._user_names()
        self._baseline = self._check(names, names, {})[0]
        self._unpicklable = []
        # Names another replica could not send us: (name -> reason).
        self._elsewhere = {}
        self._count = shell.execution_count
        self._process = process.ProcessContext()

    @property
    def unpicklable(self):
        """(name, reason) for each user name the last capture could not send,
        here or, as its delta said, on the replica that ran the last cell."""
        mine = dict(self._unpicklable)
        return list(self._unpicklable) + sorted(
            (n, why) for n, why in self._elsewhere.items() if n not in mine)

    # -- winner side --------------------------------------------------------

    def capture(self, code):
        names = self._user_names()
        mentioned = _mentioned_names(code, self.shell)
        if mentioned is not None:
            mentioned = _reached_names(mentioned, names, self.shell.user_ns)
        check = {
            name for name, value in names.items()
            if mentioned is None or name in mentioned or self._stale(name, value)
        }
        checked_ids = {id(names[n]) for n in check}
        check.update(n for n, v in names.items() if id(v) in checked_ids)

        baseline, changed, unpicklable = self._check(names, check, self._baseline)
        deleted = sorted(
            name for name, entry in self._baseline.items()
            if entry.digest is not None and (name not in baseline or baseline[name].digest is None)
        )
        count = self.shell.execution_count
        # IPython numbers and stores a cell only when it advances the count.
        history_line = count - 1 if count > self._count else None
        header, buffers = self._pack("delta", changed, baseline, deleted, count,
                                     code, history_line, unpicklable, self._process.changes())
        _device_copies_done()
        self._baseline, self._unpicklable, self._count = baseline, unpicklable, count
        for name in (*changed, *deleted):
            self._elsewhere.pop(name, None)
        return header, buffers

    def checkpoint(self):
        names = self._user_names()
        baseline, values, unpicklable = self._check(names, names, {})
        packed = self._pack("checkpoint", values, baseline, [], self.shell.execution_count,
                            None, None, unpicklable, self._process.full())
        _device_copies_done()
        return packed

    # -- receiver side ------------------------------------------------------

    def apply(self, header, buffers):
        payload = self._load(header, buffers, "delta")
        ns = self.shell.user_ns
        ns.update(payload["set"])
        for name in payload["deleted"]:
            ns.pop(name, None)
            self._baseline.pop(name, None)
        self._rebase(payload)
        for name in (*payload["set"], *payload["deleted"]):
            self._elsewhere.pop(name, None)
        self._elsewhere.update((n, why) for n, why in payload["unpicklable"])
        self._process.apply(payload["process"])
        self._store_history(payload["history_line"], payload["code"])

    def restore(self, header, buffers):
        payload = self._load(header, buffers, "checkpoint")
        ns = self.shell.user_ns
        for name in self._user_names():
            if name not in payload["set"]:
                del ns[name]
        ns.update(payload["set"])
        self._baseline = {}
        self._elsewhere = dict(payload["unpicklable"])
        self._process.apply(payload["process"])
        self._rebase(payload)

    def digest(self):
        return namespace_digest(self.name_digests())

    def name_digests(self):
        """Each user name's value digest (hex), to tell which names differ."""
        out = {}
        for name, value in self._user_names().items():
            try:
                out[name] = _value_digest(value, self.shell.user_ns).hex()
            except Exception:
                t = type(value)
                out[name] = f"unpicklable {t.__module__}.{t.__qualname__}"
        return out

    # -- internals ----------------------------------------------------------

    def _user_names(self):
        hidden = self.shell.user_ns_hidden
        return {
            name: value for name, value in self.shell.user_ns.items()
            if isinstance(name, str) and hidden.get(name, _MISSING) is not value
            and name not in _MODULE_NAMES and not _CACHE_NAME.match(name)
        }

    def _stale(self, name, value):
        entry = self._baseline.get(name)
        return (entry is None or entry.oid != id(value) or entry.digest is None
                or entry.size < SMALL)

    def _check(self, names, check, old):
        """Fingerprint the names in ``check``, then every other name holding a
        tensor that a changed value holds (``opt.step()`` changes ``model``'s
        parameters without naming it); returns the new baseline, the values to
        send and the names that could not be pickled."""
        baseline = {n: e for n, e in old.items() if n in names and n not in check}
        changed, unpicklable = {}, []
        todo, checked = sorted(check), set(check)
        while todo:
            for name in todo:
                value = names[name]
                try:
                    size, digest, tensors = _fingerprint(value, self.shell.user_ns)
                except Exception as exc:
                    unpicklable.append((name, _reason(exc)))
                    baseline[name] = _Entry(id(value), 0, None)
                    continue
                entry = old.get(name)
                if entry is None or entry.oid != id(value) or entry.digest != digest:
                    changed[name] = value
                baseline[name] = _Entry(id(value), size, digest, tensors)
            touched = set()
            for name in todo:
                if name in changed:
                    touched |= baseline[name].tensors
            todo = sorted(n for n, e in baseline.items()
                          if touched and n not in checked
                          and not touched.isdisjoint(self._tensors_held(e, names[n])))
            checked.update(todo)
        return baseline, changed, unpicklable

    def _tensors_held(self, entry, value):
        """The entry's tensors, found on first need: a receiver's entries come
        from a delta (``_rebase``), and walking every value it brought would
        cost each replica a pass over every changed model after every cell."""
        if entry.tensors is None:
            entry.tensors = _tensors_of(value, self.shell.user_ns)
        return entry.tensors

    def _pack(self, kind, values, baseline, deleted, count, code, history_line, unpicklable,
              process_change):
        payload = {
            "format": FORMAT,
            "kind": kind,
            "set": values,
            "meta": {n: (baseline[n].size, baseline[n].digest) for n in values},
            "deleted": deleted,
            "execution_count": count,
            "code": code,
            "history_line": history_line,
            "unpicklable": unpicklable,
            "process": process_change,
        }
        buffers = []

        def out_of_band(buf):
            try:
                view = buf.raw()
            except BufferError:
                return True
            if view.nbytes < OUT_OF_BAND:
                return True
            buffers.append(view)
            return False

        return _dump(payload, self.shell.user_ns, out_of_band), buffers

    def _load(self, header, buffers, kind):
        """Unpickle and check a payload without touching the namespace."""
        what = "state delta" if kind == "delta" else "state checkpoint"
        ns = self.shell.user_ns
        # cloudpickle rebinds __builtins__ in the globals of the functions it
        # rebuilds, which here is user_ns itself.
        saved = ns.get("__builtins__", _MISSING)
        remaining = iter(buffers)
        try:
            payload = _Unpickler(io.BytesIO(header), ns, remaining).load()
        except Exception as exc:
            raise ValueError(f"corrupt {what}: {type(exc).__name__}: {exc}") from exc
        finally:
            if saved is _MISSING:
                ns.pop("__builtins__", None)
            else:
                ns["__builtins__"] = saved
        if next(remaining, None) is not None:
            raise ValueError(f"corrupt {what}: more buffers than the header uses")
        problem = _malformed(payload, kind)
        if problem:
            raise ValueError(f"corrupt {what}: {problem}")
        return payload

    def _rebase(self, payload):
        ns = self.shell.user_ns
        for name, (size, digest) in payload["meta"].items():
            self._baseline[name] = _Entry(id(ns[name]), size, digest, None)
        self.shell.execution_count = self._count = payload["execution_count"]

    def _store_history(self, line, code):
        if line is None or code is None:
            return
        try:
            hm = self.shell.history_manager
            # Keep In[n] == cell n even if this replica missed cells.
            for hist in (hm.input_hist_parsed, hm.input_hist_raw):
                hist.extend([""] * (line - len(hist)))
            try:
                source = self.shell.transform_cell(code)
            except Exception:
                source = code
            hm.store_inputs(line, source, code)
        except Exception:
            pass  # history is a convenience; the namespace is already applied


def owns_its_pages(view):
    """Whether an out-of-band buffer is all of a plain numpy array that owns its
    memory from numpy's default allocator: no other object, file or device
    shares those pages, so the kernel may swap them for the delta's own
    (``back_with`` in raft-transport's shm module). A memmap, a view, a torch
    tensor or an array on foreign memory (pinned, mapped) is never swapped."""
    np = sys.modules.get("numpy")
    obj = getattr(view, "obj", None)
    if np is None or type(obj) is not np.ndarray:
        return False
    if obj.base is not None or not obj.flags.owndata or view.nbytes != obj.nbytes:
        return False
    core = getattr(np, "_core", None) or np.core
    try:
        return core.multiarray.get_handler_name(obj) == "default_allocator"
    except Exception:
        return False


def _malformed(payload, kind):
    """Why ``payload`` is not a well-formed ``kind`` payload, or None."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return "not a statesync payload"
    if payload.get("kind") != kind:
        return f"expected a {kind}, got {payload.get('kind')!r}"
    values, meta, deleted = payload.get("set"), payload.get("meta"), payload.get("deleted")
    if not isinstance(values, dict) or not all(isinstance(n, str) for n in values):
        return "bad 'set'"
    if not isinstance(meta, dict) or meta.keys() != values.keys():
        return "bad 'meta'"
    if not all(isinstance(m, tuple) and len(m) == 2 for m in meta.values()):
        return "bad 'meta'"
    if not isinstance(deleted, list) or not all(isinstance(n, str) for n in deleted):
        return "bad 'deleted'"
    if not isinstance(payload.get("execution_count"), int):
        return "bad 'execution_count'"
    line, code = payload.get("history_line"), payload.get("code")
    if line is not None and not isinstance(line, int):
        return "bad 'history_line'"
    if code is not None and not isinstance(code, str):
        return "bad 'code'"
    if not isinstance(payload.get("unpicklable"), list):
        return "bad 'unpicklable'"
    return process.malformed(payload.get("process"))
