"""Triton kernels, one file per kernel.

Every module here imports triton when it is imported; the rest of the package reaches them
only inside the launchers (or through :class:`LazyModule`), so ``import entropy_kernels``
works without Triton and triton is imported only when a Triton kernel is launched.
"""

import importlib


class LazyModule:
    """A kernel module imported on first attribute access: ``kernels = LazyModule(".name")``."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        return getattr(importlib.import_module(self._name, __name__), attribute)
