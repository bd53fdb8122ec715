"""notebookos: a Jupyter kernel for Python with replicas that share GPUs.

``python -m notebookos install`` writes the kernelspec; the kernel itself is
a Rust binary shipped in this package's wheel, started through
``python -m notebookos -f CONNECTION_FILE`` as ipykernel is through
``python -m ipykernel_launcher``.
"""
