"""Integrations of MoGA into third-party model libraries.

* :mod:`moga.integrations.diffusers`: :func:`~moga.integrations.diffusers.apply_moga` turns the self-attention
  of a diffusers ``WanTransformer3DModel`` (Wan 2.1) into MoGA in place.

Submodules import their library lazily on use, so ``import moga`` never requires diffusers.
"""
