"""A generated notebook for chaos runs: `cells(n, seed)` gives n cells that
build, mutate and delete state (ints, lists, dicts, sets, numpy arrays large
enough to travel as blobs, functions, classes and instances) with a few
deliberate errors. The same seed gives the same notebook."""

import random

SETUP = "import numpy as np\nlst = []\nd = {}\ns = set()\ntotal = 0\ntext = ''\narr = np.zeros((300, 300))"

# The namespace as comparable values; printed as one JSON line.
FINGERPRINT = r'''
import hashlib as _h, json as _j, types as _ty
def _fp(v):
    if isinstance(v, np.ndarray):
        return ["nd", list(v.shape), str(v.dtype), _h.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()]
    if isinstance(v, _ty.FunctionType):
        return ["fn", v.__name__, v.__code__.co_code.hex(), repr(v.__code__.co_consts)]
    if isinstance(v, type):
        return ["cls", v.__name__, sorted(k for k in vars(v) if not k.startswith("__"))]
    if isinstance(v, (bool, int, float, str, type(None))):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return [_fp(x) for x in v]
    if isinstance(v, dict):
        return sorted([repr(k), _fp(x)] for k, x in v.items())
    if isinstance(v, (set, frozenset)):
        return sorted(repr(x) for x in v)
    if hasattr(v, "__dict__"):
        return ["obj", type(v).__name__, _fp(vars(v))]
    return repr(v)
print(_j.dumps({k: _fp(v) for k, v in globals().items()
                if not k.startswith("_") and k not in ("In", "Out", "exit", "quit", "get_ipython")
                and not isinstance(v, _ty.ModuleType)}, sort_keys=True))
'''


def cells(n, seed):
    rng = random.Random(seed)
    out = [SETUP]
    ints, fns, classes, objs = [], [], [], []
    while len(out) < n:
        i = len(out)
        kind = rng.randrange(12)
        k = rng.randrange(1, 1000)
        if kind == 0 or not ints:
            out.append(f"v{i} = {k}\nv{i}")
            ints.append(f"v{i}")
        elif kind == 1:
            out.append(f"lst.append({k})\nlen(lst)")
        elif kind == 2:
            out.append(f"d['k{i}'] = {rng.choice(ints)} * 2\nlen(d)")
        elif kind == 3:
            out.append(f"arr = arr + {k}\nfloat(arr.sum())")
        elif kind == 4:
            out.append(f"arr[{rng.randrange(300)}, {rng.randrange(300)}] = {k}\nfloat(arr.max())")
        elif kind == 5:
            out.append(f"def f{i}(x):\n    return x * {k} + len(lst)")
            fns.append(f"f{i}")
        elif kind == 6 and fns:
            out.append(f"r{i} = {rng.choice(fns)}({rng.choice(ints)})\nr{i}")
            ints.append(f"r{i}")
        elif kind == 7:
            out.append(f"class C{i}:\n    scale = {k}\n    def __init__(self, v):\n        self.v = v * self.scale")
            classes.append(f"C{i}")
        elif kind == 8 and classes:
            out.append(f"o{i} = {rng.choice(classes)}({k})\no{i}.v")
            objs.append(f"o{i}")
        elif kind == 9 and len(ints) > 3:
            victim = ints.pop(rng.randrange(len(ints)))
            out.append(f"del {victim}")
        elif kind == 10:
            out.append(f"s.add({k % 50})\ntotal += {k}\ntext += '{chr(97 + k % 26)}'\ntotal, len(s)")
        elif kind == 11 and rng.random() < 0.3:
            out.append(rng.choice(["1 / 0", "undefined_name_here", "[][1]"]))
        else:
            out.append(f"np.float64(arr[0, 0] + {k})")
    return out[:n]
