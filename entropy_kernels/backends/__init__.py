"""Torch backends: the maths of an op's Triton launcher in vectorised PyTorch, with the same
signature, memory-bounded (chunks or tiles of rows). The custom ops in
:mod:`entropy_kernels.ops` run the launcher or its twin here, chosen by ``backend``.

Nothing here imports Triton.
"""
