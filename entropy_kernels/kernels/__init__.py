"""Triton kernels: jit code only, one file per kernel (shared @triton.jit helpers in their own
files, such as ``shaping_common.py``).

Every module here imports triton when it is imported; the rest of the package reaches them
only inside the launchers (``entropy_kernels/ops`` and the backends' launch functions), so
``import entropy_kernels`` works without Triton and triton is imported only when a Triton kernel
is launched.
"""
