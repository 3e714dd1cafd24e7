"""HPS v2.1 (Human Preference Score v2.1) as a differentiable reward.

HPS v2.1 is an OpenCLIP ViT-H-14 fine-tuned on human preferences; its score is the cosine of the
normalised image and text features (HPSv2's ``diag(image_features @ text_features.T)``, no logit
scale), about 0.25-0.40 for Flux images.

The model is built here in plain torch with open_clip's architecture and parameter names, so the
HPS state dict (``HPS_v2.1_compressed.pt``, key ``"state_dict"``) loads strictly into it, and so
does any open_clip ``CLIP`` state dict of the same family. Why not ``open_clip.create_model``:
importing ``open_clip`` imports torchvision, and torchvision's PyPI wheels are CUDA builds pinned to
one torch release (with the CPU torch of this project's CI they fail to import, and a plain
``pip install open-clip-torch`` replaces torch). Nothing here imports open_clip or torchvision; the
tokenizer is the CLIP BPE that open_clip uses (its ``SimpleTokenizer`` semantics: ftfy + html
clean, whitespace collapse, lower case, the same regex, pad with 0, truncate keeping the end token),
read from open_clip's shipped ``bpe_simple_vocab_16e6.txt.gz`` when the package files are present
(found without importing it) or from a local file / tokenizer folder given as ``tokenizer=``.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
import pickle
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.rewards.base import ImageReward, resolve_weight_file
from engine.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess

# open_clip's ViT-H-14 (the HPS v2 / v2.1 backbone); other names are read from open_clip's
# model_configs/ when its package files are installed.
BUILTIN_ARCHS = {
    "ViT-H-14": {
        "embed_dim": 1024,
        "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
    },
}
HPS_FILENAMES = ("HPS_v2.1_compressed.pt", "HPS_v2.1.safetensors", "HPS_v2_compressed.pt", "model.safetensors")

# Config keys the plain-torch model implements, with the value it assumes when a key is absent.
_VISION_KEYS = {"image_size": None, "layers": None, "width": None, "patch_size": None, "head_width": 64,
                "mlp_ratio": 4.0, "patch_dropout": 0.0, "ls_init_value": None, "global_average_pool": False,
                "attentional_pool": False, "input_patchnorm": False, "no_ln_pre": False,
                "final_ln_after_pool": False, "pool_type": "tok", "output_tokens": False,
                "timm_model_name": None, "image_mean": None, "image_std": None}
_TEXT_KEYS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
              "mlp_ratio": 4.0, "ls_init_value": None, "pool_type": "argmax", "proj_bias": False,
              "proj_type": "linear", "embed_cls": False, "pad_id": 0, "no_causal_mask": False,
              "hf_model_name": None, "hf_tokenizer_name": None, "output_tokens": False}
_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "init_logit_scale",
             "init_logit_bias"}
# (key, accepted values) that any other value of makes the architecture something this file
# does not implement: refuse rather than compute something else.
_VISION_FIXED = {"ls_init_value": (None,), "global_average_pool": (False,), "attentional_pool": (False,),
                 "input_patchnorm": (False,), "no_ln_pre": (False,), "final_ln_after_pool": (False,),
                 "pool_type": ("tok",), "timm_model_name": (None,)}
_TEXT_FIXED = {"ls_init_value": (None,), "pool_type": ("argmax",), "proj_bias": (False,),
               "proj_type": ("linear", None), "embed_cls": (False,), "pad_id": (0,),
               "no_causal_mask": (False,), "hf_model_name": (None,), "hf_tokenizer_name": (None,)}


def _open_clip_dir() -> Path | None:
    """open_clip's package folder, located without importing it (its __init__ imports torchvision)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_arch(arch) -> dict:
    """An OpenCLIP model config: a dict, a path to a JSON file (an open_clip model config, or an
    ``open_clip_config.json`` with ``model_cfg``), a built-in name, or a name in open_clip's
    shipped model_configs/."""
    if isinstance(arch, dict):
        cfg = arch
    elif isinstance(arch, (str, os.PathLike)) and (str(arch).endswith(".json") or os.sep in str(arch)):
        p = Path(arch)
        if not p.is_file():
            raise FileNotFoundError(f"OpenCLIP model config not found: {p}")
        cfg = json.loads(p.read_text())
        cfg = cfg.get("model_cfg", cfg)
    elif arch in BUILTIN_ARCHS:
        cfg = BUILTIN_ARCHS[arch]
    else:
        oc = _open_clip_dir()
        p = oc / "model_configs" / f"{arch}.json" if oc is not None else None
        if p is None or not p.is_file():
            raise ValueError(f"unknown OpenCLIP architecture {arch!r}: give one of {sorted(BUILTIN_ARCHS)}, "
                             "a name from open_clip's model_configs/ (with open-clip-torch installed), "
                             "a path to a model-config JSON, or a config dict")
        cfg = json.loads(p.read_text())
    _check_arch(cfg)
    return cfg


def _check_arch(cfg: dict) -> None:
    unknown = set(cfg) - _TOP_KEYS
    for section, keys, fixed in (("vision_cfg", _VISION_KEYS, _VISION_FIXED), ("text_cfg", _TEXT_KEYS, _TEXT_FIXED)):
        sub = cfg.get(section, {})
        unknown |= {f"{section}.{k}" for k in set(sub) - set(keys)}
        for k, ok in fixed.items():
            if sub.get(k, keys[k]) not in ok:
                unknown.add(f"{section}.{k}={sub[k]!r}")
    if cfg.get("custom_text"):
        unknown.add("custom_text=True")
    if not isinstance(cfg.get("vision_cfg", {}).get("layers", 0), int):
        unknown.add("vision_cfg.layers (a ResNet image tower)")
    if unknown:
        raise NotImplementedError(f"OpenCLIP config options not implemented by the plain-torch model: "
                                  f"{sorted(unknown)} (supported: the ViT + causal text transformer family "
                                  "of ViT-H-14 / ViT-B-32 / ViT-L-14)")


# ---------------------------------------------------------------------------------------------
# The model: open_clip's CLIP (ViT image tower, causal text transformer), same parameter names.

class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, run by SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class _ResBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", _QuickGELU() if quick_gelu else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(_ResBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal)
        return x


class _VisionTower(nn.Module):
    def __init__(self, cfg: dict, embed_dim: int, quick_gelu: bool):
        super().__init__()
        c = {**_VISION_KEYS, **cfg}
        self.image_size, patch, width = int(c["image_size"]), int(c["patch_size"]), int(c["width"])
        grid = self.image_size // patch
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, int(c["layers"]), width // int(c["head_width"]), float(c["mlp_ratio"]),
                                        quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"the image tower takes {self.image_size}x{self.image_size} inputs, "
                             f"got {tuple(x.shape[-2:])}")
        x = self.conv1(x).flatten(2).transpose(1, 2)                        # (B, grid^2, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenCLIPModel(nn.Module):
    """open_clip's ``CLIP`` (ViT image tower + causal text transformer), state-dict compatible."""

    def __init__(self, cfg: dict):
        super().__init__()
        _check_arch(cfg)
        embed_dim, quick_gelu = int(cfg["embed_dim"]), bool(cfg.get("quick_gelu", False))
        t = {**_TEXT_KEYS, **cfg["text_cfg"]}
        self.context_length, width = int(t["context_length"]), int(t["width"])
        self.visual = _VisionTower(cfg["vision_cfg"], embed_dim, quick_gelu)
        self.token_embedding = nn.Embedding(int(t["vocab_size"]), width)
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length, width))
        self.transformer = _Transformer(width, int(t["layers"]), int(t["heads"]), float(t["mlp_ratio"]), quick_gelu)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.get("init_logit_scale", 2.6592600369))))  # log(1/0.07)
        if cfg.get("init_logit_bias") is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg["init_logit_bias"])))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.visual(pixels)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        L = tokens.shape[1]
        if L > self.context_length:
            raise ValueError(f"{L} tokens exceed the context length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:L].to(self.token_embedding.weight.dtype)
        x = self.ln_final(self.transformer(x, causal=True))
        f = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> dict:
        return {"image_features": self.encode_image(pixels), "text_features": self.encode_text(tokens),
                "logit_scale": self.logit_scale.exp()}


# ---------------------------------------------------------------------------------------------
# The tokenizer: CLIP's byte-level BPE, with open_clip SimpleTokenizer's cleaning and padding.

@lru_cache()
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from bytes to printable unicode characters. The dict's order
    is the vocabulary's: the printable bytes keep their own character and come first, the other
    bytes follow, mapped to 256, 257, ... (the first 256 BPE ids are these characters in this order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


_FTFY_WARNED = False


def _clean(text: str) -> str:
    global _FTFY_WARNED
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        if not _FTFY_WARNED:
            warnings.warn("ftfy is not installed: prompts are tokenized without ftfy.fix_text "
                          "(the same ids for ordinary text; `pip install ftfy` to match open_clip exactly)")
            _FTFY_WARNED = True
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class CLIPBPETokenizer:
    """CLIP's BPE tokenizer with open_clip ``SimpleTokenizer`` semantics.

    ``__call__(texts)`` gives a (B, context_length) LongTensor: start token, BPE ids, end token, zeros;
    texts too long are truncated with the end token kept last (the text tower pools at argmax id,
    which is the end token: it has the highest id)."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]], sot: str, eot: str,
                 context_length: int = 77):
        self.encoder = encoder
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.sot_token_id, self.eot_token_id = encoder[sot], encoder[eot]
        self.context_length = context_length
        self.vocab_size = max(encoder.values()) + 1
        self.byte_encoder = _bytes_to_unicode()
        import regex  # \p{L} / \p{N} classes; a dependency of transformers and diffusers

        specials = "|".join(regex.escape(s) for s in (sot, eot))
        self.pattern = regex.compile(specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)
        self._cache = {sot: sot, eot: eot}

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_bpe_gz(cls, path, context_length: int = 77) -> "CLIPBPETokenizer":
        """From open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (a header line, then merges)."""
        lines = gzip.open(path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1] if m.strip()]
        base = list(_bytes_to_unicode().values())
        vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        return cls({t: i for i, t in enumerate(vocab)}, merges, "<start_of_text>", "<end_of_text>", context_length)

    @classmethod
    def from_vocab_merges(cls, vocab_json, merges_txt, context_length: int = 77) -> "CLIPBPETokenizer":
        """From a transformers CLIP tokenizer folder's ``vocab.json`` + ``merges.txt`` (same BPE)."""
        encoder = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines if m.strip() and not m.startswith("#version")]
        return cls(encoder, merges, "<|startoftext|>", "<|endoftext|>", context_length)

    @classmethod
    def load(cls, source=None, context_length: int = 77) -> "CLIPBPETokenizer":
        """``source``: None (open_clip's shipped BPE file), a ``.txt.gz`` BPE file, or a folder holding
        ``vocab.json`` + ``merges.txt`` or ``bpe_simple_vocab_16e6.txt.gz``."""
        if source is None:
            oc = _open_clip_dir()
            p = oc / "bpe_simple_vocab_16e6.txt.gz" if oc is not None else None
            if p is None or not p.is_file():
                raise FileNotFoundError(
                    "no CLIP BPE vocabulary: open_clip's bpe_simple_vocab_16e6.txt.gz was not found (install "
                    "open-clip-torch, `pip install --no-deps open-clip-torch` is enough) - or pass tokenizer= a "
                    "local .txt.gz BPE file or a CLIP tokenizer folder with vocab.json and merges.txt")
            return cls.from_bpe_gz(p, context_length)
        p = Path(source)
        if p.is_file():
            return cls.from_bpe_gz(p, context_length)
        if p.is_dir():
            if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
                return cls.from_vocab_merges(p / "vocab.json", p / "merges.txt", context_length)
            if (p / "bpe_simple_vocab_16e6.txt.gz").is_file():
                return cls.from_bpe_gz(p / "bpe_simple_vocab_16e6.txt.gz", context_length)
            raise FileNotFoundError(f"tokenizer folder {p} holds neither vocab.json + merges.txt nor "
                                    "bpe_simple_vocab_16e6.txt.gz")
        raise FileNotFoundError(f"tokenizer not found: {p}")

    # -- encoding ----------------------------------------------------------------------------
    def _bpe(self, token: str) -> list[str]:
        if token in self._cache:
            return self._cache[token].split(" ")
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[token] = " ".join(word)
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in self.pattern.findall(_clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(token))
        return ids

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        L = context_length or self.context_length
        out = torch.zeros(len(texts), L, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > L:
                ids = ids[:L]
                ids[-1] = self.eot_token_id
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


# ---------------------------------------------------------------------------------------------
# Loading weights

def load_state_dict_file(path, default_names=HPS_FILENAMES) -> dict[str, torch.Tensor]:
    """A state dict from a local ``.pt`` / ``.bin`` (read with ``weights_only=True``) or
    ``.safetensors`` file, or from a folder holding one of ``default_names``. A checkpoint dict with
    a ``"state_dict"`` entry (HPSv2's format) is unwrapped, and a DDP ``module.`` prefix stripped."""
    p = resolve_weight_file(path, default_names)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(p))
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise RuntimeError(f"{p} holds objects other than tensors and cannot be read with weights_only=True; "
                               "re-save its state dict (e.g. with safetensors) from a trusted environment") from e
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{p} does not hold a state dict (got {type(sd).__name__})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_openclip(path, arch="ViT-H-14", strict: bool = True) -> tuple[OpenCLIPModel, dict]:
    """Build the plain-torch OpenCLIP model for ``arch`` and load the local state dict at ``path``."""
    if not Path(path).exists():  # before building a ViT-H for nothing
        raise FileNotFoundError(f"checkpoint not found: {Path(path)}")
    cfg = resolve_arch(arch)
    sd = load_state_dict_file(path)
    sd = {k: v for k, v in sd.items() if k != "attn_mask" and not k.endswith(".attn_mask")}  # buffers, rebuilt
    if strict:
        # built on the meta device and given the checkpoint's tensors: no random init of a 1B model
        with torch.device("meta"):
            model = OpenCLIPModel(cfg)
        missing, unexpected = _key_mismatch(model, sd)
        if missing or unexpected:
            raise RuntimeError(f"state dict at {path} does not match the OpenCLIP {arch!r} model: "
                               f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                               f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
        model.load_state_dict(sd, strict=True, assign=True)
    else:
        model = OpenCLIPModel(cfg)
        model.load_state_dict(sd, strict=False)
    return model.float(), cfg


def _key_mismatch(model: nn.Module, sd: dict) -> tuple[list[str], list[str]]:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shape = [f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}" for k in sorted(set(own) & set(sd))
                 if tuple(sd[k].shape) != tuple(own[k].shape)]
    return missing + bad_shape, unexpected


def _has_tokenizer_files(folder: Path) -> bool:
    return ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()) or \
        (folder / "bpe_simple_vocab_16e6.txt.gz").is_file()


class HPSv21Reward(ImageReward):
    """HPS v2.1: cosine(image features, text features) of the HPS-tuned OpenCLIP ViT-H-14.

    Parameters
    path:       the local HPS checkpoint (``HPS_v2.1_compressed.pt``, or a ``.safetensors`` with the
                same keys, or a folder holding one of them).
    arch:       ``"ViT-H-14"`` (HPS), another open_clip ViT name, a model-config JSON path or dict.
    tokenizer:  a ``.txt.gz`` BPE file or a CLIP tokenizer folder (vocab.json + merges.txt); None: the
                ``path`` folder's own such files if it has them, else open_clip's shipped BPE file.
    resize:     ``"longest_pad"`` (HPSv2's official ``preprocess_val``: longer side to 224, zero pad) or
                ``"shortest_crop"`` (open_clip's standard one); the same for square images.
    antialias:  antialiased bicubic resizing (current torchvision's default for tensors, and PIL's).
    grad_checkpointing: recompute the towers' blocks in backward (saves memory for ViT-H).
    dtype:      the weights' dtype ("float32" as released; "bfloat16" halves ViT-H's 3.7 GiB on a
                small GPU; images are cast to it, scores returned in float32).
    """

    def __init__(self, path, arch="ViT-H-14", tokenizer=None, resize: str = "longest_pad", antialias: bool = True,
                 strict: bool = True, grad_checkpointing: bool = False, dtype: str = "float32"):
        super().__init__()
        self.model, cfg = load_openclip(path, arch, strict)
        self.model.to(getattr(torch, dtype))
        self.model.set_grad_checkpointing(grad_checkpointing)
        if tokenizer is None and Path(path).is_dir() and _has_tokenizer_files(Path(path)):
            tokenizer = path  # a reward folder that carries its vocabulary
        self.tokenizer = CLIPBPETokenizer.load(tokenizer, context_length=self.model.context_length)
        if self.tokenizer.vocab_size > self.model.token_embedding.num_embeddings:
            raise ValueError(f"tokenizer vocabulary ({self.tokenizer.vocab_size}) is larger than the model's "
                             f"({self.model.token_embedding.num_embeddings})")
        v = cfg["vision_cfg"]
        self.preprocess = ImagePreprocess(
            size=int(v["image_size"]), mean=tuple(v.get("image_mean") or OPENAI_CLIP_MEAN),
            std=tuple(v.get("image_std") or OPENAI_CLIP_STD), mode=resize, antialias=antialias,
            crop_offset="round", clamp=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # a reward model stays in eval mode

    def text_features(self, prompts: list[str], device) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(device)
        with torch.no_grad():
            return self.model.encode_text(tokens)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        dtype = self.model.text_projection.dtype
        pixels = self.preprocess(images).to(dtype)
        image_features = self.model.encode_image(pixels)
        text_features = self.text_features(prompts, images.device)
        return (image_features * text_features).sum(-1).float()
