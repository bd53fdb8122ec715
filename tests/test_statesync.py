"""statesync: replicating IPython's user namespace between replicas.

These need no kernel: they drive real InteractiveShells, in this process
or, where process boundaries matter (functions, classes, set order), in a
subprocess of the same Python that applies the captured bytes.
"""

import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
import types
from pathlib import Path

import pytest

os.environ.setdefault("IPYTHONDIR", tempfile.mkdtemp(prefix="statesync-ipython-"))

from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from traitlets.config import Config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "python-shim" / "notebookos_shim" / "statesync.py"
MODULE_NAME = "notebookos_shim.statesync"


def load_statesync():
    # The package's __init__ needs the kernel's built-in _notebookos module,
    # so stand in an empty package (pickles name statesync by module path)
    # and load the module by path.
    if "notebookos_shim" not in sys.modules:
        package = types.ModuleType("notebookos_shim")
        package.__path__ = [str(MODULE.parent)]
        sys.modules["notebookos_shim"] = package
    if MODULE_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(MODULE_NAME, MODULE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[MODULE_NAME]


statesync = load_statesync()


def new_shell():
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    return InteractiveShell(config=config)


class Replica:
    def __init__(self):
        self.shell = new_shell()
        self.sync = statesync.StateSync(self.shell)

    @property
    def ns(self):
        return self.shell.user_ns

    def run(self, code, ok=True):
        """Run a cell as the winner and capture its delta."""
        result = self.shell.run_cell(code, store_history=True)
        if ok:
            result.raise_error()
        return self.sync.capture(code)


def received(buffers):
    # What Rust hands to apply(): fresh writable copies, in order.
    return [bytearray(b) for b in buffers]


def payload(header, buffers):
    """A header's contents, unpickled apart from any namespace. Not for
    headers holding notebook classes: unpickling a class this process
    already knows re-sets its attributes (cloudpickle), rebinding its
    methods to the throwaway namespace."""
    return statesync._Unpickler(io.BytesIO(header), {}, buffers).load()


def name_digests(replica):
    """Per-name value digests: which name differs when digests do."""
    ns = replica.shell.user_ns
    return {n: statesync._value_digest(v, ns).hex() for n, v in replica.sync._user_names().items()}


RECEIVER = textwrap.dedent(
    """
    import importlib.util, json, pickle, sys, types
    package = types.ModuleType("notebookos_shim")
    package.__path__ = [{package!r}]
    sys.modules["notebookos_shim"] = package
    spec = importlib.util.spec_from_file_location({name!r}, {path!r})
    statesync = importlib.util.module_from_spec(spec)
    sys.modules[{name!r}] = statesync
    spec.loader.exec_module(statesync)
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell(config=config)
    sync = statesync.StateSync(shell)
    with open(sys.argv[1], "rb") as f:
        steps, check = pickle.load(f)
    for method, header, buffers in steps:
        getattr(sync, method)(header, [bytearray(b) for b in buffers])
    out = {{"digest": sync.digest(), "count": shell.execution_count,
            "In": list(shell.user_ns["In"]), "names": {{
        n: statesync._value_digest(v, shell.user_ns).hex() for n, v in sync._user_names().items()
    }}}}
    shell.run_cell(check, store_history=True).raise_error()
    out["result"] = shell.user_ns.get("result")
    with open(sys.argv[2], "w") as f:
        json.dump(out, f, default=repr)
    """
).format(name=MODULE_NAME, path=str(MODULE), package=str(MODULE.parent))


def run_receiver(tmp_path, steps, check="result = None"):
    """Apply ``steps`` ((method, header, buffers) ...) in a fresh process,
    then run ``check`` there; returns what the receiver reports."""
    script, data, out = tmp_path / "receiver.py", tmp_path / "steps.pkl", tmp_path / "out.json"
    script.write_text(RECEIVER)
    with open(data, "wb") as f:
        pickle.dump(([(m, h, [bytes(b) for b in bufs]) for m, h, bufs in steps], check), f)
    env = dict(os.environ)
    env.pop("PYTHONHASHSEED", None)  # a different string hash order than ours
    proc = subprocess.run(
        [sys.executable, str(script), str(data), str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


# -- plain values -------------------------------------------------------------


def test_plain_values_replicate_and_only_changes_are_sent():
    winner, other = Replica(), Replica()
    cells = ["n = 7\ns = 'text'\nd = {'k': [1, 2], 'nested': {'z': None}}", "n += 1"]
    deltas = [winner.run(c) for c in cells]

    first = payload(*deltas[0])
    assert set(first["set"]) == {"n", "s", "d"}
    assert first["deleted"] == [] and first["code"] == cells[0]
    assert set(payload(*deltas[1])["set"]) == {"n"}

    for header, buffers in deltas:
        other.sync.apply(header, received(buffers))
    assert (other.ns["n"], other.ns["s"], other.ns["d"]) == (8, "text", {"k": [1, 2], "nested": {"z": None}})
    assert other.shell.execution_count == winner.shell.execution_count == 3
    assert other.ns["In"][1:3] == cells
    assert other.sync.digest() == winner.sync.digest()

    # The receiver's baseline moved with it: nothing to send after an empty cell.
    header, _ = other.run("pass")
    assert payload(header, [])["set"] == {}


def test_functions_use_the_receivers_namespace():
    import builtins

    winner, other = Replica(), Replica()
    for code in ["base = 10\ndef plus(v):\n    return base + v", "base = 20"]:
        header, buffers = winner.run(code)
        other.sync.apply(header, received(buffers))
    assert other.ns["plus"].__globals__ is other.ns
    assert other.ns["__builtins__"] is builtins  # cloudpickle's setstate rebinds it
    other.run("base = 30")
    assert other.ns["plus"](1) == 31


def test_shared_references_within_a_delta_are_kept():
    winner, other = Replica(), Replica()
    header, buffers = winner.run("a = [1, 2]\nb = {'a': a}\nc = a")
    other.sync.apply(header, received(buffers))
    assert other.ns["b"]["a"] is other.ns["a"] is other.ns["c"]


def test_del_propagates():
    winner, other = Replica(), Replica()
    for code in ["x = 1\ny = 2", "del x"]:
        header, buffers = winner.run(code)
        other.sync.apply(header, received(buffers))
    assert payload(header, [])["deleted"] == ["x"]
    assert "x" not in other.ns and other.ns["y"] == 2


def test_rebinding_a_name_ipython_hides():
    winner, other = Replica(), Replica()
    header, buffers = winner.run("open = 'shadowed'")
    other.sync.apply(header, received(buffers))
    assert other.ns["open"] == "shadowed"
    header, buffers = winner.run("del open")
    other.sync.apply(header, received(buffers))
    assert payload(header, [])["deleted"] == ["open"] and "open" not in other.ns


def test_mutation_through_a_function_call_is_caught():
    winner, other = Replica(), Replica()
    for code in ["log = []\ndef note(v):\n    log.append(v)", "note('a')", "note('b')"]:
        header, buffers = winner.run(code)
        other.sync.apply(header, received(buffers))
        if code.startswith("note"):
            assert set(payload(header, [])["set"]) == {"log"}
    assert other.ns["log"] == ["a", "b"]


def test_magic_cells():
    winner, other = Replica(), Replica()
    cells = [
        "import numpy as np\nbig = np.zeros(1 << 18)",  # 2 MiB: only checked when named
        "%time z = 5",
        "%time big[0] = 7",
        "x = !echo hi",
    ]
    for code in cells:
        header, buffers = winner.run(code)
        other.sync.apply(header, received(buffers))
    assert other.ns["z"] == 5
    assert other.ns["big"][0] == 7
    assert list(other.ns["x"]) == ["hi"]


# -- large values ---------------------------------------------------------------


def test_large_array_goes_out_of_band(monkeypatch):
    winner, other = Replica(), Replica()
    pickled = []
    fingerprint = statesync._fingerprint
    monkeypatch.setattr(statesync, "_fingerprint", lambda v, *a: pickled.append(v) or fingerprint(v, *a))
    header, buffers = winner.run("import numpy as np\na = np.arange(100 * 2**20 // 8, dtype=np.float64)")
    assert len(header) < 64 * 1024
    assert sum(memoryview(b).nbytes for b in buffers) >= 100 * 2**20
    assert all(memoryview(b).contiguous for b in buffers)

    other.sync.apply(header, received(buffers))
    a = other.ns["a"]
    np = other.ns["np"]
    assert a.dtype == np.float64 and a.shape == (100 * 2**20 // 8,)
    assert np.array_equal(a, winner.ns["a"])
    assert a.flags.writeable
    a[0] = -1.0
    assert a[0] == -1.0 and winner.ns["a"][0] == 0.0

    # Unnamed and not rebound: not re-pickled, not sent.
    pickled.clear()
    header, buffers = winner.run("b = 1")
    assert set(payload(header, buffers)["set"]) == {"b"} and buffers == []
    assert pickled and not any(v is winner.ns["a"] for v in pickled)
    # Named in the cell: checked, and sent because it changed.
    header, buffers = winner.run("a[1] = 42.0")
    assert set(payload(header, received(buffers))["set"]) == {"a"}
    # Named but unchanged: checked, not sent.
    header, buffers = winner.run("a.sum()")
    assert payload(header, buffers)["set"] == {} and buffers == []


def test_a_large_global_changed_by_a_notebook_function_the_cell_calls_is_seen():
    # One replica only: applying a header that holds a notebook class in this
    # process would rebind the winner's class (see ``payload``).
    winner = Replica()
    winner.run(
        "import numpy as np\n"
        "big = np.zeros(1 << 18)\n"  # 2 MiB: checked only when a cell may change it
        "def poke(i):\n    big[i] = i\n"
        "def twice():\n    poke(1)\n    poke(2)\n"
        "class Trainer:\n    def step(self):\n        big[3] = 3\n"
        "    @property\n    def last(self):\n        return big[4]\n"
        "trainer = Trainer()"
    )
    for code, changed, head in [("twice()", {"big"}, [0, 1, 2, 0]),
                                ("trainer.step()", {"big"}, [0, 1, 2, 3]),
                                ("trainer.last", set(), None), ("len('big')", set(), None)]:
        header, buffers = winner.run(code)
        sent = payload(header, received(buffers))["set"]
        assert set(sent) == changed, code
        if head:
            assert list(sent["big"][:4]) == head, code


def test_globals_reached_through_decorators_closures_and_bound_methods_are_seen():
    winner = Replica()
    winner.run(
        "import functools\nimport numpy as np\n"
        "big = np.zeros(1 << 18)\n"
        "def logged(f):\n    @functools.wraps(f)\n    def wrapper(*a):\n        return f(*a)\n"
        "    return wrapper\n"
        "@logged\ndef poke():\n    big[5] = 5\n"
        "class Stepper:\n    def step(self):\n        big[6] = 6\n"
        "step = Stepper().step"
    )
    for code, at in [("poke()", 5), ("step()", 6)]:
        header, buffers = winner.run(code)
        sent = payload(header, received(buffers))["set"]
        assert set(sent) == {"big"}, code
        assert sent["big"][at] == at


def test_when_what_a_cell_reaches_cannot_be_told_every_name_is_checked(monkeypatch):
    winner = Replica()
    winner.run("import numpy as np\nbig = np.zeros(1 << 18)\ndef f():\n    pass")
    winner.ns["big"][0] = 9  # changed by nothing the next cell reaches

    def fails(value, user_ns):
        raise RuntimeError("a value whose attributes raise")

    monkeypatch.setattr(statesync, "_notebook_code", fails)
    header, buffers = winner.run("f()")
    assert "big" in payload(header, received(buffers))["set"]


def test_a_class_is_not_sent_again_once_an_instance_of_it_was_pickled():
    winner = Replica()
    winner.run("class C:\n    pass")
    winner.run("c = C()")  # pickling c caches __slotnames__ on C
    header, buffers = winner.run("n = 1")
    assert set(payload(header, buffers)["set"]) == {"n"}


def test_large_object_mutated_through_an_alias_the_cell_does_not_reach_is_not_seen():
    # The documented limit of the change-detection rule: `big` is reached only
    # through `holder`, which is sent, but `big` itself is not re-checked.
    winner = Replica()
    winner.run("import numpy as np\nbig = np.zeros(1 << 18)\nholder = {'a': big}\n"
               "def poke():\n    holder['a'][0] = 1")
    header, buffers = winner.run("poke()")
    assert set(payload(header, received(buffers))["set"]) == {"holder"}


def test_pandas_dataframe():
    pd = pytest.importorskip("pandas")
    winner, other = Replica(), Replica()
    header, buffers = winner.run(
        "import numpy as np, pandas as pd\n"
        "df = pd.DataFrame({'x': np.arange(200_000), 'y': np.linspace(0, 1, 200_000),"
        " 'label': ['a', 'b'] * 100_000})"
    )
    assert buffers, "the numeric blocks should travel out of band"
    other.sync.apply(header, received(buffers))
    pd.testing.assert_frame_equal(other.ns["df"], winner.ns["df"])
    assert other.sync.digest() == winner.sync.digest()


def test_torch_cpu_tensors():
    torch = pytest.importorskip("torch")
    winner, other = Replica(), Replica()
    header, buffers = winner.run(
        "import torch\n"
        "t = torch.arange(1 << 20, dtype=torch.float32)\n"
        "half = torch.ones(1 << 16, dtype=torch.bfloat16)\n"
        "layer = torch.nn.Linear(256, 512)"
    )
    assert sum(memoryview(b).nbytes for b in buffers) >= (4 << 20) + (128 << 10) + (512 << 10)
    assert len(header) < 64 * 1024
    other.sync.apply(header, received(buffers))
    for name in ("t", "half"):
        assert torch.equal(other.ns[name], winner.ns[name])
    assert other.ns["half"].dtype == torch.bfloat16
    weight = other.ns["layer"].weight
    assert isinstance(weight, torch.nn.Parameter) and weight.requires_grad
    assert torch.equal(weight, winner.ns["layer"].weight)
    assert other.sync.digest() == winner.sync.digest()


# -- code objects, across processes -----------------------------------------------


def test_functions_classes_and_instances_across_processes(tmp_path):
    winner = Replica()
    cells = [
        "counter = 0\nitems = []\n"
        "def bump(n):\n    global counter\n    counter += n\n    items.append(n)\n    return counter",
        "def make_adder(k):\n    def add(x):\n        return x + k\n    return add\n"
        "add3 = make_adder(3)\nsquare = lambda v: v * v",
        "class Point:\n"
        "    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
        "    def scaled(self, f):\n        return Point(self.x * f, self.y * f)\n"
        "    def norm2(self):\n        return square(self.x) + square(self.y)",
        "p = Point(3, 4)",
        "bump(5)",
        "import numpy as np\ntags = {'alpha', 'beta', 'gamma', 'delta'}",
    ]
    steps = [("apply", *winner.run(code)) for code in cells]
    check = (
        "result = [add3(4), square(5), isinstance(p, Point), p.norm2(),"
        " isinstance(p.scaled(2), Point), p.scaled(2).x, bump(1), counter, items,"
        " np.__name__, sorted(tags)]"
    )
    out = run_receiver(tmp_path, steps, check)
    assert out["result"] == [7, 25, True, 25, True, 6, 6, 6, [5, 1], "numpy",
                             ["alpha", "beta", "delta", "gamma"]]
    assert out["names"] == name_digests(winner)
    assert out["digest"] == winner.sync.digest()
    assert out["count"] == winner.shell.execution_count
    assert out["In"] == list(winner.ns["In"])


def test_checkpoint_restores_a_fresh_process(tmp_path):
    winner = Replica()
    for code in [
        "import numpy as np\narr = np.arange(50_000.0)\nmeta = {'name': 'run', 'tags': {'x', 'y'}}",
        "class Box:\n    def __init__(self, v):\n        self.v = v",
        "box = Box(arr)\nscale = lambda b: b.v.sum() * 2",
        "del meta",
    ]:
        winner.run(code)
    header, buffers = winner.sync.checkpoint()
    assert buffers

    out = run_receiver(tmp_path, [("restore", header, buffers)],
                       "result = [isinstance(box, Box), float(scale(box)), box.v is arr]")
    assert sorted(out["names"]) == ["Box", "arr", "box", "np", "scale"]
    assert out["names"] == name_digests(winner)
    assert out["digest"] == winner.sync.digest()
    assert out["result"] == [True, float(winner.ns["arr"].sum() * 2), True]


def test_restore_replaces_names_and_rebaselines():
    winner, late = Replica(), Replica()
    winner.run("a = 1\nb = [1, 2]")
    late.run("junk = 'only here'\na = 99")
    late.sync.restore(*winner.sync.checkpoint())
    assert "junk" not in late.ns and late.ns["a"] == 1
    assert late.sync.digest() == winner.sync.digest()
    header, _ = late.run("pass")
    assert payload(header, [])["set"] == {} and payload(header, [])["deleted"] == []


def test_digest_tracks_values():
    one, two = Replica(), Replica()
    for replica in (one, two):
        replica.run("x = [1, 2, 3]\ny = {'k': 'v'}")
    assert one.sync.digest() == two.sync.digest()
    two.run("x[0] = 100")
    assert one.sync.digest() != two.sync.digest()
    two.run("x[0] = 1")
    assert one.sync.digest() == two.sync.digest()
    two.run("z = None")
    assert one.sync.digest() != two.sync.digest()


# -- what cannot be sent ----------------------------------------------------------


def test_unpicklable_values_are_reported_and_skipped(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    winner, other = Replica(), Replica()
    header, buffers = winner.run(
        "import socket, threading\n"
        f"fh = open({str(path)!r})\n"
        "gen = (i for i in range(3))\n"
        "lock = threading.Lock()\n"
        "sock = socket.socket()\n"
        "ok = 42"
    )
    assert dict(winner.sync.unpicklable) == {
        "fh": "open file", "gen": "generator", "lock": "lock", "sock": "socket"
    }
    delta = payload(header, buffers)
    assert set(delta["set"]) == {"socket", "threading", "ok"}
    assert dict(delta["unpicklable"]) == dict(winner.sync.unpicklable)
    other.sync.apply(header, received(buffers))
    assert other.ns["ok"] == 42 and not {"fh", "gen", "lock", "sock"} & set(other.ns)

    # Picklable again: sent, and no longer reported. Unpicklable over a
    # replicated value: deleted on the receivers.
    header, buffers = winner.run("sock.close()\nlock = 5\nok = open(fh.name)")
    delta = payload(header, buffers)
    assert delta["set"] == {"lock": 5} and delta["deleted"] == ["ok"]
    assert dict(winner.sync.unpicklable) == {
        "fh": "open file", "gen": "generator", "sock": "socket", "ok": "open file"
    }
    other.sync.apply(header, received(buffers))
    assert other.ns["lock"] == 5 and "ok" not in other.ns
    winner.ns["fh"].close()
    winner.ns["ok"].close()


# -- corrupt input ----------------------------------------------------------------


def snapshot(replica):
    return dict(replica.sync._user_names()), replica.sync.digest(), replica.shell.execution_count


def test_corrupt_input_raises_and_changes_nothing():
    winner, other = Replica(), Replica()
    header, buffers = winner.run("x = 1")
    other.sync.apply(header, received(buffers))
    header, buffers = winner.run("import numpy as np\nx = 2\narr = np.ones(1 << 16)\ndel x")
    before = snapshot(other)

    bad_inputs = [
        (b"not a pickle", []),
        (header[: len(header) // 2], received(buffers)),
        (header, []),  # the array's buffer is missing
        (header, received(buffers) + [bytearray(b"extra")]),
        (pickle.dumps({"x": 1}), []),
        (winner.sync.checkpoint()[0], received(winner.sync.checkpoint()[1])),  # wrong kind
    ]
    for bad_header, bad_buffers in bad_inputs:
        with pytest.raises(ValueError, match="corrupt state delta"):
            other.sync.apply(bad_header, bad_buffers)
        assert snapshot(other) == before
    with pytest.raises(ValueError, match="corrupt state checkpoint"):
        other.sync.restore(header, received(buffers))
    assert snapshot(other) == before

    other.sync.apply(header, received(buffers))  # the real one still applies
    assert "x" not in other.ns and other.ns["arr"].shape == (1 << 16,)


def test_process_changes_travel_with_the_delta_and_are_checked(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    # Set first, so that monkeypatch restores what the cells change.
    for name in ("NBOS_UNIT", "NBOS_GONE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.setenv(name, "before")
    winner, other = Replica(), Replica()
    header, buffers = winner.run(
        "import os, sys\nos.environ['NBOS_UNIT'] = 'u'\ndel os.environ['NBOS_GONE']\n"
        "sys.path.append('/nbos/unit')\nos.environ['CUDA_VISIBLE_DEVICES'] = '7'")
    change = payload(header, received(buffers))["process"]
    assert change == {"env": {"NBOS_UNIT": "u"}, "unset": ["NBOS_GONE"], "path": sys.path}
    header, buffers = winner.run("y = 1")
    assert payload(header, received(buffers))["process"] is None
    full = payload(*winner.sync.checkpoint())["process"]
    assert full["exact"] and full["env"]["NBOS_UNIT"] == "u" and "CUDA_VISIBLE_DEVICES" not in full["env"]

    for bad in ({"path": "/x"}, {"env": {"A": 1}}, {"cwd": 3}, {"unset": [None]}, "cwd"):
        p = payload(header, received(buffers))
        p["process"] = bad
        with pytest.raises(ValueError, match="corrupt state delta: bad 'process'"):
            other.sync.apply(pickle.dumps(p), [])


def test_a_value_that_fails_to_load_applies_nothing(tmp_path, monkeypatch):
    (tmp_path / "statesync_only_on_winner.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    winner, other = Replica(), Replica()
    header, buffers = winner.run("y = 'new'\nimport statesync_only_on_winner as m\nthing = m.Thing()")
    sys.modules.pop("statesync_only_on_winner")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    before = snapshot(other)
    with pytest.raises(ValueError, match="corrupt state delta: ModuleNotFoundError"):
        other.sync.apply(header, received(buffers))
    assert snapshot(other) == before and "y" not in other.ns


def test_aliases_of_a_checked_name_are_checked_too():
    winner, other = Replica(), Replica()
    for code in ["import numpy as np\nbig = np.zeros(1 << 18)", "alias = big", "big[0] = 5"]:
        header, buffers = winner.run(code)
        other.sync.apply(header, received(buffers))
    assert set(payload(header, received(buffers))["set"]) == {"big", "alias"}
    assert other.ns["alias"][0] == 5 and other.ns["alias"] is other.ns["big"]


def test_cached_functions_and_by_name_wrappers(tmp_path):
    winner = Replica()
    cells = [
        "import functools\n"
        "@functools.lru_cache(maxsize=None)\n"
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
        "first = fib(20)",
        # A callable object whose class pickles it by its notebook name.
        "class ByName:\n    __module__ = '__main__'\n"
        "    def __call__(self):\n        return 1\n"
        "    def __reduce__(self):\n        return 'wrapped'\n"
        "wrapped = ByName()\nkept = 2",
    ]
    steps = [("apply", *winner.run(code)) for code in cells]
    assert [n for n, _ in winner.sync.unpicklable] == ["wrapped"]
    out = run_receiver(tmp_path, steps, "result = [fib(25), first, kept, 'wrapped' in dir()]")
    assert out["result"] == [75025, 6765, 2, False]


def test_class_digest_does_not_depend_on_pickling_an_instance(tmp_path):
    winner = Replica()
    steps = [("apply", *winner.run("class Base:\n    pass\nclass Child(Base):\n    kind = 'c'\n")),
             # Pickling an instance caches __slotnames__ on the class, here only.
             ("apply", *winner.run("child = Child()"))]
    out = run_receiver(tmp_path, steps)
    assert out["digest"] == winner.sync.digest()


def cuda_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_optimizer_step_alone_replicates_the_model_it_changes(device):
    """`opt.step()` names only `opt`; `model` holds the same parameters, so
    it is checked too (it is large: it would not be otherwise)."""
    torch = pytest.importorskip("torch") if device == "cpu" else cuda_torch()
    winner, other = Replica(), Replica()
    header, buffers = winner.run(
        "import torch\n"
        "torch.manual_seed(0)\n"
        f"model = torch.nn.Linear(1024, 512).to({device!r})\n"  # 2 MiB of weights
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        f"x = torch.randn(8, 1024, device={device!r})\n"
    )
    other.sync.apply(header, received(buffers))
    for code, sent in [("model(x).pow(2).mean().backward()", set()), ("opt.step()", {"model", "opt"})]:
        header, buffers = winner.run(code)
        assert set(payload(header, received(buffers))["set"]) >= sent, code
        other.sync.apply(header, received(buffers))
    assert torch.equal(other.ns["model"].weight.detach().cpu(), winner.ns["model"].weight.detach().cpu())
    # The receiver learned which tensors the values it applied share, before
    # any cell of its own named them: a change through `opt` alone shows in `model`.
    header, buffers = other.run(
        "with torch.no_grad():\n    for p in opt.param_groups[0]['params']:\n        p.add_(1.0)")
    assert "model" in payload(header, received(buffers))["set"]


@pytest.mark.parametrize("impl", ["foreach", "fused", "for-loop"])
def test_torch_gpu_state_travels_as_host_copies_and_every_optimizer_step_is_seen(impl):
    """Fused and foreach optimizer steps do not bump torch's version counters,
    so change detection compares GPU contents (a digest on the GPU)."""
    torch = cuda_torch()
    kw = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}[impl]
    winner, other = Replica(), Replica()
    header, buffers = winner.run(
        "import torch\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 8)).cuda()\n"
        f"opt = torch.optim.Adam(model.parameters(), lr=1e-3, **{kw!r})\n"
        "x = torch.randn(64, 512, device='cuda')\n"
    )
    other.sync.apply(header, received(buffers))
    step = "opt.zero_grad()\nmodel(x).pow(2).mean().backward()\nopt.step()\n"
    for _ in range(3):
        header, buffers = winner.run(step)
        other.sync.apply(header, received(buffers))
        mine, theirs = winner.ns["opt"].state_dict(), other.ns["opt"].state_dict()
        for p, q in zip(winner.ns["model"].parameters(), other.ns["model"].parameters()):
            assert not q.is_cuda and torch.equal(p.detach().cpu(), q.detach())
        for k, st in mine["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(st[name].cpu(), theirs["state"][k][name]), (impl, name)
    # Nothing that ran no step is sent again, nor even digested: the model and
    # its optimizer state count as large (their GPU bytes), so only a cell that
    # may change them checks them.
    digested = []
    device_digest = statesync.device_digest
    statesync.device_digest = lambda torch, t: digested.append(t) or device_digest(torch, t)
    try:
        header, buffers = winner.run("y = 1")
    finally:
        statesync.device_digest = device_digest
    assert sum(memoryview(b).nbytes for b in buffers) == 0
    assert digested and all(t is winner.ns["x"] for t in digested)  # x: 128 KiB, small


def test_torch_gpu_state_moves_off_through_its_host_mirror_only_while_unchanged():
    torch = cuda_torch()
    winner = Replica()
    winner.run("import torch\nw = torch.nn.Parameter(torch.randn(1 << 20, device='cuda'))\n")
    gpu = sys.modules["notebookos_shim.gpu"]  # loaded by the capture
    w = winner.ns["w"]
    assert gpu.host_mirror(w, statesync.device_digest(torch, w)) is not None
    with torch.no_grad():
        w.mul_(2)  # changed after the capture: the mirror no longer applies
    expected = w.detach().cpu()
    assert gpu.host_mirror(w, statesync.device_digest(torch, w)) is None
    gpu._move(w, "cpu", torch)
    torch.cuda.synchronize()
    assert not w.is_cuda and torch.equal(w.detach(), expected)
