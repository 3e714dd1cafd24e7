"""Test-session set-up.

triton fixes interpret-vs-compile for every ``@triton.jit`` (its own standard library included)
when it is first imported, so without a GPU the interpreter is switched on here, before any test
module can import triton, and pinned through ``triton.knobs``. The environment variable is taken
away again: ``kernels.backend`` reads ``TRITON_INTERPRET`` per call, and left set, every CPU call
of a fused op in the engine tests would run through the slow interpreter. Tests that want the
Triton path on CPU set it themselves (``monkeypatch.setenv("TRITON_INTERPRET", "1")``).
"""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    _prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import triton

    triton.knobs.runtime.interpret = True
    if _prev is None:
        os.environ.pop("TRITON_INTERPRET")
    else:
        os.environ["TRITON_INTERPRET"] = _prev


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
