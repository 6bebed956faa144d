"""Typed launchers of the Triton kernels: they allocate, pick the grid and launch (their
arguments come validated by the public functions).

Nothing here imports Triton at import time: each launcher imports its kernel module (and so
Triton) when it is first called. Kernels (jit code only) live in `entropy_kernels/kernels`.
"""
