"""Triton kernels of moon_fast, installed as ``moon_fast.kernels`` (package-dir mapping in pyproject.toml).

One op per module: the ``@triton.jit`` kernels, their launchers and (where the op needs one) the
autograd Function live together. Import these modules only through the ops in ``moon_fast.ops``,
which pick a backend; on a machine without a GPU they run under ``TRITON_INTERPRET=1``.
"""
