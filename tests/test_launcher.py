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
