"""Kernel tests run the Triton kernels through the interpreter on CPU, or compiled on a GPU.

tests/conftest.py puts triton in interpreter mode for the process when there is no GPU; the
autouse fixture below sets TRITON_INTERPRET per kernel test so that ``kernels.backend`` picks the
triton backend for CPU tensors there (and only there).
"""

import pytest
import torch

from kernels import backend

HAS_CUDA = torch.cuda.is_available()
_record: dict = {}


@pytest.fixture(autouse=True)
def _record_backends():
    """Every kernel test runs inside a ``backend.recording()``; :func:`ran` reads it."""
    with backend.recording() as rec:
        _record["ran"] = rec
        yield
    _record.pop("ran", None)


def ran(op: str) -> str | None:
    """The backend of the latest call of ``op`` in the running test (None if it never ran)."""
    return _record["ran"].get(op)


@pytest.fixture(autouse=True)
def _triton_backend_on_cpu(request, monkeypatch):
    """Lets ``backend.pick`` choose triton for CPU tensors in kernel tests (interpreter)."""
    if HAS_CUDA or request.node.get_closest_marker("gpu"):
        return
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
