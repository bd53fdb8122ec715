"""Real front-ends against the kernel: JupyterLab and Notebook 7 in Chromium
(tests/e2e/), papermill, nbconvert, and what VS Code's Jupyter extension
reads (the kernelspec list and kernel_info).

All of them run tests/e2e/frontends.ipynb, the browser by typing its cells.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from conftest import KERNEL_BIN, ROOT
from frontend import Frontend

E2E = ROOT / "tests" / "e2e"
NOTEBOOK = E2E / "frontends.ipynb"
E2E_OUT = ROOT / "test-output" / "e2e"
JUPYTER = [sys.executable, "-m", "jupyter"]

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _outputs(nb, source_start):
    [cell] = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(source_start)]
    return cell.outputs


def _text(outputs):
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def check_executed(nb, greeting, repeat):
    """What every headless run of frontends.ipynb must have produced."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            errors = [o for o in cell.outputs if o.output_type == "error"]
            assert not errors, (cell.source, errors)
    assert _text(_outputs(nb, "for _ in range")) == f"{greeting} from notebookos\n" * repeat
    plot = _outputs(nb, "import matplotlib")
    assert any("image/png" in o.get("data", {}) for o in plot), plot
    [slider] = [o for o in _outputs(nb, "import ipywidgets") if WIDGET_VIEW in o.get("data", {})]
    model_id = slider["data"][WIDGET_VIEW]["model_id"]
    report = _text(_outputs(nb, "%notebookos"))
    assert "replica 1: talks to Jupyter" in report, report
    assert "GPU grant: " in report, report
    return model_id


def test_papermill_with_parameters(tmp_path):
    out = tmp_path / "out.ipynb"
    subprocess.run(
        [sys.executable, "-m", "papermill", str(NOTEBOOK), str(out), "-k", "notebookos",
         "-p", "greeting", "hi", "-p", "repeat", "2", "--cwd", str(tmp_path)],
        check=True, timeout=300,
    )
    nb = nbformat.read(out, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "greeting = \"hi\"" in injected[0].source, injected
    check_executed(nb, "hi", 2)
    assert nb.metadata.papermill.parameters == {"greeting": "hi", "repeat": 2}


def test_nbconvert_execute(tmp_path):
    # The kernel comes from the notebook's metadata, as it does for users.
    subprocess.run(
        JUPYTER + ["nbconvert", "--to", "notebook", "--execute", str(NOTEBOOK),
                   "--output-dir", str(tmp_path), "--output", "out"],
        check=True, timeout=300,
    )
    nb = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    model_id = check_executed(nb, "hello", 1)
    # nbclient saves the widgets' state, which it learns over their comms.
    state = nb.metadata.widgets[WIDGET_STATE]["state"]
    assert state[model_id]["state"]["value"] == 7, state[model_id]


def test_jupyterlab_and_notebook7_in_chromium():
    """tests/e2e/run.sh: launcher, print, plot, widget, %notebookos,
    interrupt, restart in JupyterLab; then the notebook in Notebook 7."""
    env = dict(os.environ, PY=sys.executable, NOTEBOOKOS_KERNEL_BIN=str(KERNEL_BIN))
    # Its own process group, so a timeout stops the server and browser too
    # (run.sh's trap cleans up on SIGTERM).
    proc = subprocess.Popen(["bash", str(E2E / "run.sh")], env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pytest.fail(f"tests/e2e/run.sh did not finish; see {E2E_OUT}")
    results = json.loads((E2E_OUT / "results.json").read_text())
    failed = [f"{r['name']}: {r['detail']}" for r in results if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert [r["name"] for r in results] == [
        "launcher", "pick-kernel", "print", "matplotlib", "ipywidgets",
        "notebookos-magic", "interrupt", "restart", "notebook7",
    ]
    assert rc == 0
    for shot in ["01-launcher", "02-print-plot-widget", "03-notebookos-magic",
                 "04-interrupted", "05-restarted", "06-notebook7"]:
        assert (E2E_OUT / f"{shot}.png").stat().st_size > 0, shot


# -- what VS Code's Jupyter extension relies on -------------------------------

def notebookos_cli(*args, **env):
    """`python -m notebookos ...` with this checkout's debug binary in place
    of a wheel's."""
    env = dict(os.environ, NOTEBOOKOS_KERNEL_BIN=str(KERNEL_BIN), **env)
    return subprocess.run([sys.executable, "-m", "notebookos", *args], env=env,
                          capture_output=True, text=True)


def test_kernelspec_as_installed_is_listed_for_vscode(tmp_path):
    """VS Code finds kernels in Jupyter's kernelspec directories: install
    the spec as users do and read it back."""
    prefix = tmp_path / "prefix"
    # Only this prefix on Jupyter's path: the suite's own notebookos spec
    # would shadow it (and the installer says so).
    env = dict(os.environ, JUPYTER_PATH=str(prefix / "share" / "jupyter"))
    out = notebookos_cli("install", "--prefix", str(prefix), "--display-name", "NB OS",
                         "--env", "OMP_NUM_THREADS=2", "--env", "EMPTY=",
                         JUPYTER_PATH=env["JUPYTER_PATH"])
    assert out.returncode == 0, out.stderr
    spec_dir = prefix / "share" / "jupyter" / "kernels" / "notebookos"
    assert str(spec_dir) in out.stdout
    out = subprocess.run(JUPYTER + ["kernelspec", "list", "--json"], env=env, check=True,
                         capture_output=True, text=True).stdout
    listed = json.loads(out)["kernelspecs"]["notebookos"]
    assert Path(listed["resource_dir"]) == spec_dir
    spec = listed["spec"]
    assert spec["display_name"] == "NB OS"
    assert spec["language"] == "python"
    # VS Code sends interrupt_request for "message", SIGINT otherwise.
    assert spec["interrupt_mode"] == "message"
    # This environment's Python starts the binary, as ipykernel's spec does.
    assert spec["argv"] == [sys.executable, "-m", "notebookos", "-f", "{connection_file}"]
    assert spec["env"] == {"OMP_NUM_THREADS": "2", "EMPTY": ""}
    assert spec["metadata"]["debugger"] is False
    assert {p.name for p in spec_dir.glob("logo-*.png")} == {"logo-32x32.png", "logo-64x64.png"}


@pytest.mark.parametrize("args, message", [
    (["--env", "NOEQUALS"], "--env takes KEY=VALUE"),
    (["--name", "a b"], "kernel names are letters"),
])
def test_install_refuses_bad_options(tmp_path, args, message):
    out = notebookos_cli("install", "--prefix", str(tmp_path), *args)
    assert out.returncode != 0 and message in out.stderr, out
    assert not (tmp_path / "share" / "jupyter" / "kernels").exists()


def test_uninstall_leaves_other_kernels_alone(tmp_path):
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "other"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": ["/usr/bin/other", "-f"]}))
    out = notebookos_cli("uninstall", "--prefix", str(tmp_path), "--name", "other")
    assert out.returncode != 0 and "not a notebookos kernelspec" in out.stderr, out
    assert (spec_dir / "kernel.json").exists()
    out = notebookos_cli("uninstall", "--prefix", str(tmp_path), "--name", "missing")
    assert out.returncode != 0 and "no kernelspec 'missing'" in out.stderr, out


def test_installed_under_ipykernels_name_and_undone(tmp_path, monkeypatch):
    """`python -m notebookos install --name python3` makes notebookos the
    kernel clients start for "python3"; uninstalling puts ipykernel's spec
    back."""
    prefix, later = tmp_path / "prefix", tmp_path / "later"
    path = lambda p: str(p / "share" / "jupyter")  # noqa: E731
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
        [path(prefix), os.environ["JUPYTER_PATH"], path(later)]))
    # The kernel that the spec starts finds the binary the same way.
    monkeypatch.setenv("NOTEBOOKOS_KERNEL_BIN", str(KERNEL_BIN))

    def specs():
        out = subprocess.run(JUPYTER + ["kernelspec", "list", "--json"], check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out)["kernelspecs"]

    out = notebookos_cli("install", "--name", "python3", "--prefix", str(prefix))
    assert out.returncode == 0, out.stderr
    spec = specs()["python3"]
    assert Path(spec["resource_dir"]) == prefix / "share" / "jupyter" / "kernels" / "python3"
    assert spec["spec"]["argv"][1:3] == ["-m", "notebookos"]
    fe = Frontend(kernel_name="python3")
    try:
        reply = fe.shell_reply(fe.kc.kernel_info())["content"]
        assert "notebookos" in reply["banner"]
        reply, _ = fe.execute("x = 6 * 7")
        assert reply["status"] == "ok"
    finally:
        fe.close()

    # Installed where an earlier python3 wins: refused, and says which one.
    out = notebookos_cli("install", "--name", "python3", "--prefix", str(later))
    assert out.returncode != 0 and "Jupyter starts 'python3' from" in out.stderr, out.stderr

    out = notebookos_cli("uninstall", "--name", "python3", "--prefix", str(prefix))
    assert out.returncode == 0 and "ipykernel's again" in out.stdout, out
    spec = specs()["python3"]["spec"]
    assert "ipykernel_launcher" in spec["argv"], spec


def test_kernel_info_language_info_for_vscode():
    """VS Code takes the notebook's language, file extension and syntax
    highlighting from kernel_info's language_info."""
    fe = Frontend()
    try:
        msg_id = fe.kc.kernel_info()
        reply = fe.shell_reply(msg_id)["content"]
        python_version = fe.eval("__import__('platform').python_version()").strip("'")
    finally:
        fe.close()
    assert reply["status"] == "ok"
    assert reply["language_info"] == {
        "name": "python",
        "version": python_version,
        "mimetype": "text/x-python",
        "file_extension": ".py",
        "pygments_lexer": "ipython3",
        "codemirror_mode": {"name": "ipython", "version": 3},
        "nbconvert_exporter": "python",
    }
    assert reply["protocol_version"].startswith("5.")
    assert "notebookos" in reply["banner"]
