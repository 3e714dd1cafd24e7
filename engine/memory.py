"""Measuring memory without a GPU: bytes autograd saves for backward, and live / peak bytes of the
storages an operation creates (works on FakeTensors, so full-size models can be sized on a CPU).
Used by the lean blocks' budget planner and by the benches.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class SavedBytes:
    """Context manager: bytes of the tensors autograd saves for backward, each storage once.

    Storages of ``exclude`` (the weights, which live anyway) are not counted, so the figure is
    what the graph adds on top of the model.
    """

    def __init__(self, exclude=()):
        self.bytes = 0
        self._seen = WeakIdKeyDictionary()
        for t in exclude:
            st = _storage_key(t)
            if st is not None:
                self._seen[st] = True
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        st = _storage_key(t)
        if st is not None and st not in self._seen:
            self._seen[st] = True
            self.bytes += st.nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the mode and still alive.

    Storages first seen as inputs (parameters, caller-owned tensors) count as pre-existing and are
    never added; every new output storage is added once and subtracted when it is freed. Works on
    fake tensors, so a full-size model's activation peak can be measured on a CPU.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._known = WeakIdKeyDictionary()

    def _track(self, t, new: bool):
        if not isinstance(t, torch.Tensor):
            return
        st = _storage_key(t)
        if st is None or st in self._known:
            return
        self._known[st] = True
        if new:
            shape, n = tuple(t.shape), st.nbytes()
            self._account(shape, n)
            weakref.finalize(st, self._account, shape, -n)

    def _account(self, shape: tuple, n: int) -> None:
        """A storage of ``shape`` appeared (n > 0) or was freed (n < 0); subclasses may split the
        count by shape."""
        self.live += n
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            self._track(a, new=False)
        out = func(*args, **kwargs)
        for o in torch.utils._pytree.tree_leaves(out):
            self._track(o, new=True)
        return out


def held_bytes(fn, exclude=()) -> tuple[object, int]:
    """Run ``fn()``; return its result and the bytes of the storages it created that are still
    alive afterwards, less its outputs': what a forward leaves held for its backward. Unlike
    saved-tensor hooks this also sees what selective checkpointing caches outside the graph."""
    import gc

    mode = PeakLiveBytes()
    with mode:
        for t in exclude:
            mode._track(t, new=False)
        out = fn()
    gc.collect()
    outs = {}
    for o in torch.utils._pytree.tree_leaves(out):
        if isinstance(o, torch.Tensor):
            st = _storage_key(o)
            outs[id(st)] = st.nbytes() if st is not None else 0
    return out, mode.live - sum(outs.values())
