"""The process state a cell changes besides its namespace: the working
directory (``%cd``, ``os.chdir``), the environment (``%env``,
``os.environ[...] = ...``) and ``sys.path``. Notebooks lean on all three
(``sys.path.insert(0, "..")`` then an import), so a peer that runs the next
cell must see what the winner's cell left behind, as one ipykernel process
would.

Each replica compares against what it last sent or applied and a delta
carries only what changed. The variables this kernel sets per replica
(``NOTEBOOKOS_*``, and ``CUDA_VISIBLE_DEVICES``, which the GPU binding owns)
never travel.
"""

import logging
import os
import sys

_log = logging.getLogger("notebookos")


def _local(name):
    return name.startswith("NOTEBOOKOS_") or name == "CUDA_VISIBLE_DEVICES"


def _snapshot():
    env = {k: v for k, v in os.environ.items() if not _local(k)}
    return os.getcwd(), list(sys.path), env


class ProcessContext:
    """The last working directory, ``sys.path`` and environment this replica
    sent or applied."""

    def __init__(self):
        self._cwd, self._path, self._env = _snapshot()

    def full(self):
        """Everything, for a checkpoint (a replica that starts from it may
        have been spawned by a process whose directory has since changed)."""
        self._cwd, self._path, self._env = _snapshot()
        return {"cwd": self._cwd, "path": list(self._path), "env": dict(self._env), "exact": True}

    def changes(self):
        """What changed since the last call, or None."""
        cwd, path, env = _snapshot()
        out = {}
        if cwd != self._cwd:
            out["cwd"] = cwd
        if path != self._path:
            out["path"] = path
        changed = {k: v for k, v in env.items() if self._env.get(k) != v}
        unset = sorted(k for k in self._env if k not in env)
        if changed:
            out["env"] = changed
        if unset:
            out["unset"] = unset
        self._cwd, self._path, self._env = cwd, path, env
        return out or None

    def apply(self, change):
        """Makes this process match ``change`` (from ``full`` or ``changes``)."""
        if not change:
            return
        for name, value in change.get("env", {}).items():
            if not _local(name):
                os.environ[name] = value
        unset = change.get("unset", [])
        if change.get("exact"):
            unset = [k for k in os.environ if k not in change.get("env", {})]
        for name in unset:
            if not _local(name):
                os.environ.pop(name, None)
        if "path" in change:
            sys.path[:] = change["path"]
        if "cwd" in change:
            try:
                os.chdir(change["cwd"])
            except OSError as exc:
                # Another host may lack the directory; the namespace still applies.
                _log.warning("cannot enter the working directory %r: %s",
                             change["cwd"], exc)
        self._cwd, self._path, self._env = _snapshot()


def malformed(change):
    """Why ``change`` is not a process change, or None."""
    if change is None:
        return None
    if not isinstance(change, dict):
        return "bad 'process'"
    if "cwd" in change and not isinstance(change["cwd"], str):
        return "bad 'process' cwd"
    path = change.get("path", [])
    if not isinstance(path, list) or not all(isinstance(p, str) for p in path):
        return "bad 'process' path"
    env, unset = change.get("env", {}), change.get("unset", [])
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        return "bad 'process' env"
    if not isinstance(unset, list) or not all(isinstance(k, str) for k in unset):
        return "bad 'process' unset"
    return None
