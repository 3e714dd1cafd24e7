"""Fused Triton / CUDA kernels for the LeapAlign engine.

Each op lives in its own module with its torch reference, its kernels and its autograd
wrapper. This package imports nothing from ``engine``.
"""
