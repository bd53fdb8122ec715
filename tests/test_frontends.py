"""Real front-ends against the kernel: JupyterLab and Notebook 7 in Chromium
(tests/e2e/), papermill, nbconvert, and what VS Code's Jupyter extension
reads (the kernelspec list and kernel_info).

All of them run tests/e2e/frontends.ipynb, the browser by typing its cells.
"""

import json
import os
import shutil
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

def test_kernelspec_as_installed_is_listed_for_vscode(tmp_path):
    """VS Code finds kernels in Jupyter's kernelspec directories; install
    the spec from kernelspec/ as install.sh does and read it back."""
    stage = tmp_path / "stage"
    stage.mkdir()
    for logo in (ROOT / "kernelspec").glob("logo-*.png"):
        shutil.copy(logo, stage)
    (stage / "kernel.json").write_text("{}")
    prefix = tmp_path / "prefix"
    subprocess.run(JUPYTER + ["kernelspec", "install", "--name", "notebookos", "--prefix",
                              str(prefix), str(stage)], check=True, capture_output=True)
    spec_dir = prefix / "share" / "jupyter" / "kernels" / "notebookos"
    template = (ROOT / "kernelspec" / "kernel.json.in").read_text()
    (spec_dir / "kernel.json").write_text(
        template.replace("@KERNEL_BIN@", str(KERNEL_BIN)).replace("@PYTHON@", sys.executable)
    )
    env = dict(os.environ, JUPYTER_PATH=str(prefix / "share" / "jupyter"))
    out = subprocess.run(JUPYTER + ["kernelspec", "list", "--json"], env=env, check=True,
                         capture_output=True, text=True).stdout
    listed = json.loads(out)["kernelspecs"]["notebookos"]
    assert Path(listed["resource_dir"]) == spec_dir
    spec = listed["spec"]
    assert spec["display_name"] == "Python 3 (notebookos)"
    assert spec["language"] == "python"
    # VS Code sends interrupt_request for "message", SIGINT otherwise.
    assert spec["interrupt_mode"] == "message"
    assert spec["argv"][0] == str(KERNEL_BIN) and "{connection_file}" in spec["argv"]
    assert spec["env"]["NOTEBOOKOS_PYTHON"] == sys.executable
    assert spec["metadata"]["debugger"] is False
    assert {p.name for p in spec_dir.glob("logo-*.png")} == {"logo-32x32.png", "logo-64x64.png"}


def test_installed_under_ipykernels_name_and_undone(tmp_path, monkeypatch):
    """`install.sh --name python3` (kernelspec/install.sh underneath) makes
    notebookos the kernel clients start for "python3"; uninstalling puts
    ipykernel's spec back."""
    script = ROOT / "kernelspec" / "install.sh"
    prefix, later = tmp_path / "prefix", tmp_path / "later"
    path = lambda p: str(p / "share" / "jupyter")  # noqa: E731
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(
        [path(prefix), os.environ["JUPYTER_PATH"], path(later)]))

    def specs():
        out = subprocess.run(JUPYTER + ["kernelspec", "list", "--json"], check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out)["kernelspecs"]

    def install(*args):
        return subprocess.run(["bash", str(script), "--python", sys.executable, *args],
                              capture_output=True, text=True)

    out = install("--bin", str(KERNEL_BIN), "--name", "python3", "--prefix", str(prefix))
    assert out.returncode == 0, out.stderr
    spec = specs()["python3"]
    assert Path(spec["resource_dir"]) == prefix / "share" / "jupyter" / "kernels" / "python3"
    assert spec["spec"]["argv"][0].endswith("notebookos-kernel")
    fe = Frontend(kernel_name="python3")
    try:
        reply = fe.shell_reply(fe.kc.kernel_info())["content"]
        assert "notebookos" in reply["banner"]
        reply, _ = fe.execute("x = 6 * 7")
        assert reply["status"] == "ok"
    finally:
        fe.close()

    # Installed where an earlier python3 wins: refused, and says which one.
    out = install("--bin", str(KERNEL_BIN), "--name", "python3", "--prefix", str(later))
    assert out.returncode != 0 and "Jupyter starts 'python3' from" in out.stderr, out.stderr

    out = install("--uninstall", "--name", "python3", "--prefix", str(prefix))
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
