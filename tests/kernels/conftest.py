"""Kernel tests run the Triton kernels through the interpreter on CPU, or compiled on a GPU.

triton fixes interpret-vs-compile for every ``@triton.jit`` (its own standard library included)
when it is first imported, so the interpreter has to be switched on before that import. We do it
here, for the whole process when there is no GPU, but pin it through ``triton.knobs`` and take the
environment variable away again: ``kernels.backend`` reads ``TRITON_INTERPRET`` at call time, and
with it set every CPU call in the other test modules would go through the (slow) interpreter.
The kernel tests set it back per test with the autouse fixture below.
"""
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
_INTERPRETER_PROBLEM = None

if not HAS_CUDA:
    if "triton" in sys.modules:
        import triton

        if not triton.knobs.runtime.interpret:
            _INTERPRETER_PROBLEM = (
                "triton was imported in compile mode before tests/kernels/conftest.py ran, so its "
                "kernels cannot run on CPU; set TRITON_INTERPRET=1 before triton's first import "
                "(e.g. at the top of tests/conftest.py) or run tests/kernels first")
    else:
        _prev = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        import triton

        triton.knobs.runtime.interpret = True  # later @jit decorations stay interpreted
        if _prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _prev


@pytest.fixture(autouse=True)
def _triton_backend_on_cpu(request, monkeypatch):
    """Lets ``backend.pick`` choose triton for CPU tensors in kernel tests (interpreter)."""
    if HAS_CUDA or request.node.get_closest_marker("gpu"):
        return
    if _INTERPRETER_PROBLEM:
        pytest.fail(_INTERPRETER_PROBLEM)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device():
    """Where the Triton-vs-reference tests run: the GPU when there is one, else the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to max |expected|: one number per tensor, fair to both
    large activations and near-zero entries."""
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2


def assert_close(actual, expected, dtype, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    err = rel_err(actual, expected)
    assert err <= tol(dtype), f"{what}: relative error {err:.3g} > {tol(dtype):.0e}"
