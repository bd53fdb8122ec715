"""`python -m notebookos`: how the kernel binary is found and started."""

import os
import subprocess
import sys
import sysconfig

import pytest

from conftest import KERNEL_BIN
from notebookos import launch


def test_this_pythons_libpython_is_found():
    directory = launch.libpython_dir()
    assert os.path.exists(os.path.join(directory, launch.libpython_name()))


def test_a_python_without_a_shared_libpython_is_told_what_is_missing(monkeypatch, tmp_path):
    real = sysconfig.get_config_var
    fake = {"LIBDIR": str(tmp_path), "LIBPL": str(tmp_path), "MULTIARCH": "",
            "INSTSONAME": "libpython3.99.so.1.0"}
    monkeypatch.setattr(sysconfig, "get_config_var", lambda k: fake.get(k, real(k)))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path))
    with pytest.raises(launch.LaunchError) as e:
        launch.libpython_dir()
    assert "libpython3.99.so.1.0" in str(e.value) and sys.executable in str(e.value)
    assert "--enable-shared" in str(e.value)


def test_the_kernel_gets_the_library_directory_in_front_of_the_users():
    env = launch.kernel_environment("/py/lib", {"LD_LIBRARY_PATH": "/opt/x", "HOME": "/h"})
    assert env["LD_LIBRARY_PATH"] == "/py/lib:/opt/x"
    assert env[launch.LIBPYTHON_DIR_VAR] == "/py/lib"
    assert env["NOTEBOOKOS_PYTHON"] == sys.executable and env["HOME"] == "/h"
    assert launch.kernel_environment("/py/lib", {})["LD_LIBRARY_PATH"] == "/py/lib"


def test_without_a_wheel_or_override_the_error_says_how_to_get_one(monkeypatch):
    monkeypatch.delenv(launch.BINARY_OVERRIDE_VAR, raising=False)
    with pytest.raises(launch.LaunchError, match="pip install notebookos"):
        launch.kernel_binary()
    monkeypatch.setenv(launch.BINARY_OVERRIDE_VAR, "/nonexistent/notebookos-kernel")
    with pytest.raises(launch.LaunchError, match="not an executable"):
        launch.kernel_binary()


def test_the_launcher_runs_the_binary_and_its_errors_are_one_line():
    env = dict(os.environ, NOTEBOOKOS_KERNEL_BIN=str(KERNEL_BIN))
    out = subprocess.run([sys.executable, "-m", "notebookos", "--help"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "install|uninstall" in out.stdout and "agent" in out.stdout
    env["NOTEBOOKOS_KERNEL_BIN"] = "/nonexistent"
    out = subprocess.run([sys.executable, "-m", "notebookos", "-f", "x.json"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.startswith("notebookos: ") and out.stderr.count("\n") == 1, out.stderr


class _FakeModule:
    """Stands in for the wheel's notebookos._kernel."""

    def __init__(self, seed):
        self.seed, self.ran = seed, None

    def hash_seed(self, argv):
        return self.seed

    def main(self, argv):
        self.ran = argv
        return 7


class _Execed(Exception):
    pass


def _no_exec(monkeypatch):
    calls = []

    def execv(path, argv):
        calls.append((path, argv, os.environ.get("PYTHONHASHSEED")))
        raise _Execed

    monkeypatch.setattr(os, "execv", execv)
    return calls


def test_the_wheels_kernel_runs_in_this_python_started_with_the_groups_hash_seed(monkeypatch):
    monkeypatch.delenv(launch.BINARY_OVERRIDE_VAR, raising=False)
    module = _FakeModule(seed=1234)
    monkeypatch.setattr(launch, "_installed_module", lambda: module)
    calls = _no_exec(monkeypatch)
    # Started with another seed: this Python starts again with the group's.
    monkeypatch.setenv("PYTHONHASHSEED", "99")
    with pytest.raises(_Execed):
        launch.run_kernel(["-f", "c.json"])
    assert calls == [(sys.executable, [sys.executable, "-m", "notebookos", "-f", "c.json"], "1234")]
    assert module.ran is None
    # Started with it: the kernel runs here, and its status is the launcher's.
    assert launch.run_kernel(["-f", "c.json"]) == 7
    assert module.ran == [launch.BINARY, "-f", "c.json"] and len(calls) == 1


def test_a_subcommand_runs_in_this_python_whatever_its_seed(monkeypatch):
    monkeypatch.delenv(launch.BINARY_OVERRIDE_VAR, raising=False)
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    module = _FakeModule(seed=None)
    monkeypatch.setattr(launch, "_installed_module", lambda: module)
    calls = _no_exec(monkeypatch)
    assert launch.run_kernel(["agent"]) == 7 and calls == []


def test_an_override_runs_the_named_binary_even_where_the_wheels_module_is(monkeypatch, tmp_path):
    module = _FakeModule(seed=1)
    monkeypatch.setattr(launch, "_installed_module", lambda: module)
    monkeypatch.setenv(launch.BINARY_OVERRIDE_VAR, str(KERNEL_BIN))
    seen = []

    def execve(path, argv, env):
        seen.append(path)
        raise _Execed

    monkeypatch.setattr(os, "execve", execve)
    with pytest.raises(_Execed):
        launch.run_kernel(["-f", "c.json"])
    assert seen == [str(KERNEL_BIN)] and module.ran is None
