"""The op-family tests, one file per family of :mod:`imaml_kernels.ops` (a package, so that
``tests/ops/test_cg.py``, the CG ops, and ``tests/test_cg.py``, the solver, can share a name)."""
