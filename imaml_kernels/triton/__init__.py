"""Triton kernels. Importing this package imports ``triton``; the dispatch layer only does
so when the Triton backend is chosen. ``TRITON_INTERPRET=1`` must be set before import to
run them on the CPU."""
