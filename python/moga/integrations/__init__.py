"""Integrations of MoGA into third-party model libraries.

* :mod:`moga.integrations.diffusers`: :func:`~moga.integrations.diffusers.apply_moga` turns the self-attention
  (or joint text-video attention) of a diffusers video transformer into MoGA in place: Wan 2.1 and its
  derivatives (SkyReels-V2, VACE, ChronoEdit), LTX-Video, HunyuanVideo, CogVideoX, Mochi (docs/integrations.md).
  The processors of the joint (MMDiT) families are in :mod:`moga.integrations.diffusers_mmdit`; all of them share
  :mod:`moga.integrations._core`.

Submodules import their library lazily on use, so ``import moga`` never requires diffusers.
"""
