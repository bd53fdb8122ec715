"""The Python side of a GPU grant: make the granted device current before a
cell; the state stays on the GPU after it while the grant is cached, and
moves to host memory when the agent revokes the grant (another kernel needs
the GPU) or it idles, so that this replica then holds no GPU memory.

What moves: ``torch.nn.Module`` objects (parameters and buffers, in place,
so optimizers keep pointing at the same parameters), tensors, optimizer
state, and tensors one level inside lists, tuples and dicts bound to user
names or held in ``Out``. The names moved are kept in the replicated
``_notebookos_on_gpu`` list, so whichever replica wins a later GPU cell moves
them back onto the GPU it was granted. Not covered: tensors reachable only
deeper inside other objects, CuPy/JAX arrays, and the CUDA context itself
(PyTorch keeps it for the life of the process, a few hundred MiB).
"""

import importlib.util
import os
import sys
import time
import weakref

REGISTRY = "_notebookos_on_gpu"


def _torch(load=False):
    torch = sys.modules.get("torch")
    if torch is None and load and importlib.util.find_spec("torch") is not None:
        # Imported before a GPU cell so the granted device is made current
        # before the cell's own CUDA work picks a default one.
        import torch
    if torch is None:
        return None
    try:
        return torch if torch.cuda.is_available() else None
    except Exception:
        return None


# Host copies of GPU tensors made when their values were last replicated
# (statesync's capture), per tensor object, with a digest of the contents
# computed on the GPU: while the tensor is the same object with the same
# contents, moving it off the GPU is a pointer swap, not a copy. An entry
# goes when its tensor does.
_MIRRORS = {}


def host_mirror(t, digest):
    """The pinned host copy of GPU tensor `t` if one is kept and `digest`
    (its contents now, ``statesync.device_digest``) is the one it was made at."""
    entry = _MIRRORS.get(id(t))
    if entry is None or digest is None:
        return None
    ref, kept, host = entry
    return host if ref() is t and kept == digest else None


def keep_host_mirror(t, digest, host):
    if digest is None:
        return
    key = id(t)
    try:
        ref = weakref.ref(t, lambda _, key=key: _MIRRORS.pop(key, None))
    except TypeError:
        return
    _MIRRORS[key] = (ref, digest, host)


def _to(t, device, torch):
    """`t`'s data on `device`; to the host through its mirror or pinned memory
    (PCIe at full speed, asynchronously: callers synchronize)."""
    data = t.data
    if device == "cpu" and data.is_cuda:
        if _MIRRORS:
            from .statesync import device_digest

            mirror = host_mirror(t, device_digest(torch, data))
            if mirror is not None:
                return mirror
        if data.is_contiguous():
            try:
                host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            except RuntimeError:
                return data.to(device)
            return host.copy_(data, non_blocking=True)
    return data.to(device, non_blocking=True)


def _move_tensor(t, device, torch):
    # In place (the same tensor object), so every reference sees the move.
    t.data = _to(t, device, torch)
    # .grad of a non-leaf tensor is None and reading it warns.
    if (t.is_leaf or t.retains_grad) and t.grad is not None:
        t.grad.data = _to(t.grad, device, torch)


def _move(value, device, torch):
    """Moves what `value` holds on or off the GPU; returns bytes moved."""
    moved = 0
    to_gpu = device != "cpu"
    if isinstance(value, torch.nn.Module):
        for t in list(value.parameters()) + list(value.buffers()):
            if t.is_cuda != to_gpu:
                moved += t.numel() * t.element_size()
                _move_tensor(t, device, torch)
        return moved
    if isinstance(value, torch.Tensor):
        if value.is_cuda != to_gpu:
            moved += value.numel() * value.element_size()
            _move_tensor(value, device, torch)
        return moved
    if isinstance(value, torch.optim.Optimizer):
        for state in value.state.values():
            for k, t in list(state.items()):
                if isinstance(t, torch.Tensor) and t.is_cuda != to_gpu:
                    moved += t.numel() * t.element_size()
                    state[k] = _to(t, device, torch)
        return moved
    if isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, (torch.Tensor, torch.nn.Module)):
                moved += _move(v, device, torch)
        return moved
    if isinstance(value, dict):
        for v in value.values():
            if isinstance(v, (torch.Tensor, torch.nn.Module)):
                moved += _move(v, device, torch)
    return moved


def _candidates(ns):
    for name, value in list(ns.items()):
        if name.startswith("__"):
            continue
        yield name, value
    out = ns.get("Out")
    if isinstance(out, dict):
        for key, value in list(out.items()):
            yield f"Out[{key}]", value


def bind(shell, gpus, fake):
    """Before a cell on the granted GPUs."""
    os.environ["NOTEBOOKOS_GPUS_GRANTED"] = ",".join(str(g) for g in gpus)
    torch = None if fake else _torch(load=True)
    if fake or torch is None or not gpus:
        return "no device to bind"
    device = f"cuda:{gpus[0]}"
    torch.cuda.set_device(gpus[0])
    ns = shell.user_ns
    names = set(ns.get(REGISTRY) or ())
    started, moved = time.perf_counter(), 0
    for name, value in _candidates(ns):
        if name in names or name.startswith("Out["):
            moved += _move(value, device, torch)
    torch.cuda.synchronize()
    return f"{moved} bytes to {device} in {time.perf_counter() - started:.3f} s"


def unbind(shell):
    """After the cell: everything on a GPU to host memory, caches emptied."""
    os.environ.pop("NOTEBOOKOS_GPUS_GRANTED", None)
    torch = _torch()
    if torch is None:
        return "no device state"
    ns = shell.user_ns
    started, moved, names = time.perf_counter(), 0, []
    for name, value in _candidates(ns):
        n = _move(value, "cpu", torch)
        if n and not name.startswith("Out["):
            names.append(name)
        moved += n
    torch.cuda.synchronize()
    _MIRRORS.clear()  # the host copies are the values now
    torch.cuda.empty_cache()
    previous = set(ns.get(REGISTRY) or ())
    ns[REGISTRY] = sorted(previous | set(names))
    return f"{moved} bytes to host in {time.perf_counter() - started:.3f} s ({', '.join(names) or 'nothing'})"


def _holds_device_state(value, torch):
    if isinstance(value, torch.nn.Module):
        return any(t.is_cuda for t in list(value.parameters()) + list(value.buffers()))
    if isinstance(value, torch.Tensor):
        return value.is_cuda
    if isinstance(value, torch.optim.Optimizer):
        return any(isinstance(t, torch.Tensor) and t.is_cuda
                   for st in value.state.values() for t in st.values())
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, (torch.Tensor, torch.nn.Module)) and _holds_device_state(v, torch)
                   for v in value)
    if isinstance(value, dict):
        return any(isinstance(v, (torch.Tensor, torch.nn.Module)) and _holds_device_state(v, torch)
                   for v in value.values())
    return False


def register(shell):
    """Before a delta is captured: names holding device state join the
    replicated registry, so a replica that receives them (as host copies)
    moves them onto its own GPU in its next GPU cell."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    ns = shell.user_ns
    previous = set(ns.get(REGISTRY) or ())
    names = {name for name, value in _candidates(ns)
             if not name.startswith("Out[") and _holds_device_state(value, torch)}
    if not names <= previous:
        ns[REGISTRY] = sorted(previous | names)
    _mirror_grads(ns, torch)


def _mirror_grads(ns, torch):
    """Gradients do not travel with a delta (a parameter pickles without its
    .grad), so the capture does not copy them; copy them here, once per
    change, so that moving the state off later is a pointer swap for them
    too. Synchronized with the capture's own copies."""
    from .statesync import device_digest

    for _, value in _candidates(ns):
        if not isinstance(value, torch.nn.Module):
            continue
        for p in value.parameters():
            g = p.grad
            if g is None or not g.is_cuda or not g.is_contiguous():
                continue
            digest = device_digest(torch, g)
            if host_mirror(g, digest) is not None:
                continue
            try:
                host = torch.empty(g.shape, dtype=g.dtype, pin_memory=True)
            except RuntimeError:
                return
            keep_host_mirror(g, digest, host.copy_(g, non_blocking=True))
