"""Triton kernels of moga, installed as ``moga.kernels``. Each op is a folder: fused kernels beside a
short literal ``naive.py`` reference."""
