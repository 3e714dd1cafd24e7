"""On-disk cache of prompt embeddings, so the text encoders (T5-XXL is ~9 GiB in bf16) need not
stay in memory while the transformer trains.

One safetensors file per prompt, ``<cache_dir>/<key[:2]>/<key>.safetensors`` with
``key = sha256(json([encoder_id, prompt]))``. Per prompt rather than per batch because training
batches are drawn at random: a batch-keyed shard would almost never be hit again, while a
prompt-keyed one is hit by every batch holding that prompt. It also means a lookup is one path,
a damaged file costs one prompt, and two processes filling the same cache only ever race on a
whole file (each write goes to a temporary file that ``os.replace`` renames into place).

Each file holds ``prompt_embeds`` (L, D) and ``pooled`` (P,) exactly as the encoder returned
them (dtype included), and metadata: the format, encoder id, prompt, key and a sha256 of the
tensors' bytes. A file that does not parse, or whose metadata or checksum do not match, is
treated as corrupt: recomputed and rewritten with a warning naming it, or, when no encoder is
available (``encoder=None``), a ``ValueError`` naming it.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from engine.checkpoint import save_atomic

__all__ = ["CachedTextEncoder", "precompute", "encoder_identity", "pipeline_encoder_id", "cache_key"]

FORMAT = "leapalign-embeds-1"


def cache_key(encoder_id: str, prompt: str) -> str:
    return hashlib.sha256(json.dumps([encoder_id, prompt]).encode("utf-8")).hexdigest()


def pipeline_encoder_id(path: str, max_sequence_length: int = 512, dtype: torch.dtype | str = torch.bfloat16) -> str:
    """Identity of a ``PipelineTextEncoder``: its folder (absolute), sequence length and dtype (bf16
    and fp32 encoders give different embeddings)."""
    return f"flux-pipeline:{os.path.realpath(path)}:max_sequence_length={int(max_sequence_length)}:dtype={str(dtype).replace('torch.', '')}"


def encoder_identity(encoder) -> str:
    """A string naming everything that determines an encoder's outputs, for the cache key. Other
    encoders can name themselves with a ``cache_id`` attribute."""
    from engine.flux.text import PipelineTextEncoder
    from engine.flux.tiny import HashTextEncoder

    if isinstance(getattr(encoder, "cache_id", None), str):
        return encoder.cache_id
    if isinstance(encoder, HashTextEncoder):
        return (f"hash-text-encoder:seed={encoder.seed}:joint_dim={encoder.joint_dim}:pooled_dim={encoder.pooled_dim}"
                f":max_length={encoder.max_length}:vocab_size={encoder.vocab_size}")
    if isinstance(encoder, PipelineTextEncoder):
        te = getattr(encoder.pipe, "text_encoder_2", None) or getattr(encoder.pipe, "text_encoder", None)
        path = getattr(encoder.pipe, "name_or_path", None) or encoder.pipe.config["_name_or_path"]
        return pipeline_encoder_id(path, encoder.max_sequence_length,
                                   te.dtype if te is not None else "unknown")
    raise TypeError(f"no identity known for a {type(encoder).__name__}; pass encoder_id explicitly")


def _digest(pe: torch.Tensor, pooled: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in (pe, pooled):
        h.update(str(t.dtype).encode() + str(list(t.shape)).encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CachedTextEncoder:
    """``.encode(prompts) -> (prompt_embeds (B, L, D), pooled (B, P))`` on the CPU, reading cached
    prompts from disk and encoding (in one call) and writing only the missing ones.

    ``encoder`` is an object with ``.encode``, a zero-argument factory building one (called on the
    first miss; ``release()`` drops what it built), or None (read-only: a miss is an error).
    """

    def __init__(self, encoder, cache_dir: str | Path, encoder_id: str | None = None):
        self.cache_dir = Path(cache_dir)
        if encoder is not None and not hasattr(encoder, "encode") and not callable(encoder):
            raise TypeError("encoder must have .encode, be a factory building one, or be None")
        self._factory: Callable | None = encoder if (encoder is not None and not hasattr(encoder, "encode")) else None
        self._encoder = None if self._factory is not None else encoder
        if encoder_id is None:
            if self._encoder is None:
                raise ValueError("encoder_id is needed when the encoder is a factory or None")
            encoder_id = encoder_identity(self._encoder)
        self.encoder_id = str(encoder_id)
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ encoder
    @property
    def encoder(self):
        if self._encoder is None and self._factory is not None:
            self._encoder = self._factory()
        return self._encoder

    @property
    def has_encoder(self) -> bool:
        return self._encoder is not None or self._factory is not None

    def release(self) -> None:
        """Drop an encoder this cache built from its factory (it is rebuilt on a later miss)."""
        if self._factory is not None:
            self._encoder = None

    # ------------------------------------------------------------------ files
    def path(self, prompt: str) -> Path:
        key = cache_key(self.encoder_id, prompt)
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    def _read(self, prompt: str, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached pair; raises ValueError (naming the file) when it is damaged or not this entry."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                pe, pooled = f.get_tensor("prompt_embeds"), f.get_tensor("pooled")
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"corrupt embedding cache file {path}: {e}") from None
        if meta.get("format") != FORMAT or meta.get("encoder_id") != self.encoder_id or meta.get("prompt") != prompt:
            raise ValueError(f"corrupt embedding cache file {path}: metadata does not match this entry")
        if meta.get("sha256") != _digest(pe, pooled):
            raise ValueError(f"corrupt embedding cache file {path}: checksum mismatch")
        return pe, pooled

    def _write(self, prompt: str, pe: torch.Tensor, pooled: torch.Tensor) -> None:
        path = self.path(prompt)
        pe, pooled = pe.detach().cpu().contiguous(), pooled.detach().cpu().contiguous()
        meta = {"format": FORMAT, "encoder_id": self.encoder_id, "prompt": prompt,
                "key": path.stem, "sha256": _digest(pe, pooled)}
        save_atomic(path, {"prompt_embeds": pe, "pooled": pooled}, meta)

    # ------------------------------------------------------------------ API
    def encode(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        todo = []
        for p in dict.fromkeys(prompts):
            path = self.path(p)
            if not path.exists():
                todo.append(p)
                continue
            try:
                found[p] = self._read(p, path)
                self.hits += 1
            except ValueError as e:
                if not self.has_encoder:
                    raise
                warnings.warn(f"{e}; recomputing it")
                todo.append(p)
        if todo:
            if not self.has_encoder:
                raise KeyError(f"prompt(s) not in the embedding cache {self.cache_dir} and no encoder "
                               f"to compute them: {todo[:3]}")
            pe, pooled = self.encoder.encode(todo)
            self.misses += len(todo)
            for i, p in enumerate(todo):
                one = (pe[i].detach().cpu().contiguous(), pooled[i].detach().cpu().contiguous())
                self._write(p, *one)
                found[p] = one
        return (torch.stack([found[p][0] for p in prompts]), torch.stack([found[p][1] for p in prompts]))

    __call__ = encode

    def missing(self, prompts: list[str]) -> list[str]:
        """Prompts with no cache file (damaged files are found only when read)."""
        return [p for p in dict.fromkeys(prompts) if not self.path(p).exists()]

    def precompute(self, prompts: list[str], batch_size: int = 16, progress: bool = False) -> int:
        """Encode and write every prompt not yet cached; returns how many were computed."""
        todo = self.missing(prompts)
        bar = None
        if progress and todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="embed cache", dynamic_ncols=True)
        for i in range(0, len(todo), batch_size):
            self.encode(todo[i: i + batch_size])
            if bar is not None:
                bar.update(len(todo[i: i + batch_size]))
        if bar is not None:
            bar.close()
        return len(todo)


def precompute(encoder, prompts: list[str], cache_dir: str | Path, encoder_id: str | None = None,
               batch_size: int = 16, progress: bool = False) -> int:
    """Fill ``cache_dir`` with the embeddings of ``prompts``; returns how many were computed."""
    return CachedTextEncoder(encoder, cache_dir, encoder_id).precompute(prompts, batch_size, progress)
