"""A fast subset of the differential runs (tests/differential.py): public
notebooks from nbclient's and papermill's source distributions, through
ipykernel and through notebookos with 3 replicas, every output equal after
normalising what varies from run to run. `bash bench/differential.sh` runs
the whole corpus."""

import importlib.util

import pytest

import differential

# One of each kind of output: text, errors and SyntaxErrors (whose message
# names the cell's file), stdin refused, rich display (PNG, SVG), display
# updates, widgets and other comms, clear_output, unicode.
SUBSET = [
    "Factorials.ipynb",
    "broken.ipynb",
    "Disable Stdin.ipynb",
    "Inline Image.ipynb",
    "SVG.ipynb",
    "update-display-id.ipynb",
    "JupyterWidgets.ipynb",
    "Clear Output.ipynb",
    "UnicodePy3.ipynb",
]


@pytest.fixture(scope="module")
def corpus():
    import conftest

    differential.ipykernel_spec(conftest._SPEC_DIR)
    return differential.corpus()


@pytest.mark.parametrize("name", SUBSET)
@pytest.mark.parametrize("on_peer", [False, True], ids=["replica-1", "peer"])
def test_outputs_equal_ipykernels(corpus, name, on_peer):
    assert differential.compare(corpus[name], on_peer) == []


def test_the_corpus_is_large_enough_and_every_exclusion_exists(corpus):
    compared = set(corpus) - set(differential.NOT_COMPARED)
    assert len(compared) >= 30, sorted(compared)
    assert set(differential.NOT_COMPARED) <= set(corpus)


def test_cells_are_named_as_ipykernel_names_them():
    """The cell file name (seen in SyntaxErrors and tracebacks) is
    ipykernel's murmur2 of the source, for any text."""
    from ipykernel.compiler import murmur2_x86

    spec = importlib.util.spec_from_file_location(
        "shim_compiler", differential.ROOT / "python-shim" / "notebookos_shim" / "compiler.py")
    compiler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compiler)
    for text in ["", "a", "ab", "abc", "abcd", "print 'x'", "x = 1\n" * 50, "ü∂é – 字"]:
        assert compiler.murmur2(text.encode()) == murmur2_x86(text, 0xC70F6907), text


def test_normalisation_leaves_what_a_user_sees():
    out = differential.output({"output_type": "stream", "name": "stdout",
                               "text": "<object at 0x7f3a2b1c9d80> took 12.5 ms\n"})
    assert out["text"] == "<object at 0xADDR> took DURATION\n"
    # The kernel's own frames go, wherever the kernel is installed (a
    # checkout under /tmp included), and coloured or not.
    err = differential.output({"output_type": "error", "ename": "E", "evalue": "v", "traceback": [
        "Cell In[1], line 1", "File /x/site-packages/ipykernel/kernelbase.py:1, in f()",
        "\x1b[36mFile \x1b[39m/tmp/clone/python-shim/notebookos_shim/kernel.py:2, in g()", "E: v"]})
    assert err["traceback"] == ["Cell In[1], line 1", "E: v"]
    # A different value is a difference.
    a = {"cells": [{"source": "1", "execution_count": 1, "outputs": [out]}], "error": None}
    b = {"cells": [{"source": "1", "execution_count": 1,
                    "outputs": [dict(out, text="other\n")]}], "error": None}
    assert differential.differences(a, b)
