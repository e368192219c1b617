"""llmx's Triton kernels, importable as `llmx.kernels` (this directory is mapped onto that package in
pyproject.toml, so no top-level `kernels` module shadows the PyPI package of that name).

Every kernel has a plain PyTorch reference next to it that serves CPUs and is the test oracle. On a
machine without a GPU, tests run the kernels in Triton's interpreter (TRITON_INTERPRET=1, set before
the kernel modules are imported).
"""
