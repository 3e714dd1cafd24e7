"""Block swap: the frozen weights of N transformer blocks live in (pinned) host memory and are
copied onto the device just before use, one block ahead, on a side CUDA stream.

What moves: every frozen ``nn.Linear`` / ``Fp8Linear`` of a swapped block (peft's ``base_layer``s
and the untargeted linears, ~99 % of a FLUX block's bytes); LoRA's A / B and the tiny QK-norm
weights stay on the device. The swapped blocks are the last N in execution order (double blocks,
then single blocks), so a rollout step's copy of the first swapped block overlaps the resident
blocks that run before it.

How: a forward pre-hook on each of those linears puts device copies of its tensors into the
module, and a forward hook puts the host tensors back. The device copies are new tensor objects,
so what autograd saves for backward is the copy, kept alive exactly as long as the graph needs it;
hooks on the linears (not on the block) also fire in checkpoint recomputation inside the block
forward (policies ``lean`` / ``full``), so a checkpointed block fetches its weights again in
backward instead of keeping them. (diffusers' group offloading, built for inference, moves every
tensor of a group by reassigning ``.data``, trainable LoRA weights included, from hooks that
replace each block's ``forward``, which the lean policies replace too.)

Device memory for the swapped weights: the block in use and the prefetched next (a block's copy
is dropped when the block after the next is fetched), in a checkpointed backward also the block
whose backward still holds its copy, plus what a graph-keeping pass without checkpointing keeps.
With one swapped block the copy is never dropped: swap at least three to save anything.

The order is learned from the calls: the next block is the neighbour in the direction of the last
two calls (forward in the rollout and the forward passes, backward in checkpoint recomputation),
cyclic in the forward direction so that the last block prefetches the first for the next step. A
wrong guess costs a copy on the compute stream, never a wrong result. This bookkeeping is the one
place the hot path writes state: which copies are in flight.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def _swappable(m: nn.Module) -> bool:
    from kernels.fp8_linear import Fp8Linear

    own = [*m.parameters(recurse=False)]
    return isinstance(m, (nn.Linear, Fp8Linear)) and bool(own) and not any(p.requires_grad for p in own)


def blocks_in_order(transformer) -> list[nn.Module]:
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def block_bytes(block: nn.Module) -> int:
    """Bytes of the tensors block swap moves for ``block``."""
    return sum(t.numel() * t.element_size() for m in block.modules() if _swappable(m)
               for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)] if t is not None)


class BlockSwap:
    """The swapped blocks' host copies, the side stream and the copies in flight."""

    def __init__(self, blocks: list[nn.Module], device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.leaves: list[list[nn.Module]] = []      # per swapped block, its swapped linears
        self.host: dict[int, tuple[dict, dict]] = {}  # id(linear) -> its host parameters, buffers
        self.index: dict[int, int] = {}               # id(linear) -> swapped block number
        self.inflight: dict[int, tuple[dict, object]] = {}   # block -> ({(id, name): device tensor}, event)
        self.last: int | None = None
        self.direction = 1
        self.copies = 0          # blocks copied (bytes moved = sum over copies; counted for the bench)
        self.bytes_moved = 0
        self.misses = 0          # copies not prefetched: made on the compute stream when needed
        for b, block in enumerate(blocks):
            leaves = [m for m in block.modules() if _swappable(m)]
            for m in leaves:
                for store in (m._parameters, m._buffers):
                    for name, t in store.items():
                        if t is None:
                            continue
                        host = t.detach().to("cpu")
                        if self.cuda:     # pinned: the copies can run asynchronously on the side stream
                            host = host.pin_memory()
                        store[name] = nn.Parameter(host, requires_grad=False) if isinstance(t, nn.Parameter) else host
                self.host[id(m)] = (dict(m._parameters), dict(m._buffers))
                self.index[id(m)] = b
                m.register_forward_pre_hook(self._enter)
                # always_call: the host tensors go back even when the forward raises
                m.register_forward_hook(self._leave, always_call=True)
            self.leaves.append(leaves)

    def host_tensor_ids(self) -> set[int]:
        return {id(t) for params, buffers in self.host.values() for t in [*params.values(), *buffers.values()]
                if t is not None}

    def swapped_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for params, buffers in self.host.values()
                   for t in [*params.values(), *buffers.values()] if t is not None)

    # -------------------------------------------------------------------- copies
    def _copy(self, b: int) -> tuple[dict, object]:
        """Device copies of block ``b``'s tensors, made on the side stream on CUDA."""
        out, moved = {}, 0
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext(), torch.no_grad():
            for m in self.leaves[b]:
                for store in (m._parameters, m._buffers):
                    for name, t in store.items():
                        if t is None:
                            continue
                        d = torch.empty(t.shape, dtype=t.dtype, device=self.device)
                        d.copy_(t, non_blocking=self.cuda)
                        out[(id(m), name)] = d
                        moved += t.numel() * t.element_size()
            event = torch.cuda.Event() if self.cuda else None
            if event is not None:
                event.record(self.stream)
        self.copies += 1
        self.bytes_moved += moved
        return out, event

    def _fetch(self, b: int) -> dict:
        if b in self.inflight:
            tensors, event = self.inflight[b]
        else:
            self.misses += 1
            tensors, event = self._copy(b)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors.values():
                # made on the side stream, used on this one: the allocator must not hand the
                # memory out again before this stream is done with it
                t.record_stream(current)
        if self.last is not None and b != self.last:
            # one block back: checkpoint recomputation in backward; anything else (the next block,
            # the first one again for the next pass) runs forward
            self.direction = -1 if b == self.last - 1 else 1
        self.last = b
        nxt = (b + self.direction) % len(self.leaves) if self.direction > 0 else b - 1
        keep = {b} | ({nxt} if nxt >= 0 and nxt != b else set())
        for k in [k for k in self.inflight if k not in keep]:
            del self.inflight[k]    # its memory returns once the compute that uses it is done
        self.inflight[b] = (tensors, None)
        if nxt in keep and nxt != b and nxt not in self.inflight:
            self.inflight[nxt] = self._copy(nxt)
        return tensors

    # -------------------------------------------------------------------- hooks
    def _enter(self, m: nn.Module, args):
        b = self.index[id(m)]
        tensors = self.inflight[b][0] if b == self.last and b in self.inflight else self._fetch(b)
        for store in (m._parameters, m._buffers):
            for name in store:
                if store[name] is not None:
                    store[name] = tensors[(id(m), name)]

    def _leave(self, m: nn.Module, args, output):
        for store, saved in zip((m._parameters, m._buffers), self.host[id(m)]):
            store.update(saved)

    def reset(self) -> None:
        """Forget the copies in flight and the order (a measurement starts from nothing on the device)."""
        self.inflight.clear()
        self.last, self.direction = None, 1
