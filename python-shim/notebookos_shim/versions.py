"""Versions for kernel_info, found without importing IPython.

importlib.metadata costs ~80 ms to import; kernel_info is answered before
IPython finishes loading, so the version comes from IPython's dist-info
directory name next to the package, with importlib.metadata as fallback.
"""

import importlib.util
import os


def ipython_version():
    spec = importlib.util.find_spec("IPython")
    if spec and spec.origin:
        site = os.path.dirname(os.path.dirname(spec.origin))
        for entry in os.listdir(site):
            low = entry.lower()
            if low.startswith("ipython-") and low.endswith(".dist-info"):
                return entry[len("ipython-"):-len(".dist-info")]
    from importlib.metadata import version

    return version("ipython")
