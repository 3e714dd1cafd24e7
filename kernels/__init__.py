"""Fused Triton / CUDA kernels for the LeapAlign engine.

Each op lives in its own module with its torch reference, its kernels, their launch description
(``*_launch``: grid, num_warps, constexprs and arguments, in one place) and its autograd wrapper.
``utils`` holds the shared row and launch helpers, ``backend`` picks the implementation per call
(and reports what ran through ``backend.recording()``), ``aot`` compiles every kernel for sm_90 /
sm_80 without a GPU. This package imports nothing from ``engine``.
"""
