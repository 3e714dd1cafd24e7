"""HPSv3 (MizzenAI, "HPSv3: Towards Wide-Spectrum Human Preference Score") as a differentiable reward.

HPSv3 is Qwen2-VL-7B-Instruct with a reward head on the last hidden state of a special
``<|Reward|>`` token; the head outputs (mu, sigma) and the score is mu (about 5-15 for good
images). The conventions below were read from the HPSv3 code (github MizzenAI/HPSv3 at its
2025-08-19 state, as mirrored in the fork Guanzhou-Ke/HPSv3, commit 5931ac4; hpsv3/ paths):

- model (model/qwen2vl_trainer.py ``Qwen2VLRewardModelBT``, config/HPSv3_7B.yaml,
  utils/parser.py): ``rm_head_type: ranknet`` without ``rm_head_kwargs``, so the head is
  ``Sequential(Linear(H, 1024), ReLU, Dropout(0.05), Linear(1024, 16), ReLU, Linear(16, 2))``
  (keys ``rm_head.0/3/5``), kept in float32 (train.py: ``model.rm_head.to(torch.float32)``;
  its forward runs the head under a float32 autocast, i.e. on the hidden state cast to fp32);
  ``output_dim: 2``; ``reward_token: special`` reads the head at the one position per sequence
  where ``input_ids == id(<|Reward|>)``; inference.py / README: ``reward[0]`` (mu) is the score.
- the language model sees plain 1-D positions: the HPSv3 forward embeds the tokens itself,
  scatters the vision features into the ``<|image_pad|>`` slots and calls the text decoder with
  ``position_ids=None``, so Qwen2-VL's M-RoPE index (``get_rope_index``) is never computed and
  the decoder uses ``arange(L)`` for all three rotary sections (transformers' Qwen2-VL text
  model's default, 4.45 as in 5.x). Done the same way here.
- tokenizer (train.py ``create_model_and_processor``): the Qwen2-VL-7B-Instruct processor with
  ``padding_side="right"`` plus ``add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})``,
  then ``resize_token_embeddings(len(tokenizer))``: ``<|Reward|>`` is the first id after the base
  vocabulary and the checkpoint's embedding has ``len(tokenizer)`` rows (checked on load).
- prompt (dataset/data_collator_qwen.py, inference.py ``prepare_batch``): one user message,
  the image first, then ``INSTRUCTION.format(text_prompt=prompt) + prompt_with_special_token``,
  rendered by the Qwen2-VL chat template with ``add_generation_prompt=True`` (the default
  system prompt comes from the template). ``HPSV3_INSTRUCTION`` / ``HPSV3_REWARD_PROMPT`` below
  are those strings, byte for byte.
- image (inference.py, dataset/utils.py ``fetch_image``): ``min_pixels = max_pixels =
  256 * 28 * 28``; qwen-vl-utils' ``smart_resize`` (factor 28) then PIL bicubic resize (tensors:
  torchvision bicubic, antialias); the processor then finds the size already valid and only
  rescales, normalises with the CLIP mean / std and patchifies (patch 14, temporal patch 2, merge 2).
  A 512x512 or 1024x1024 image becomes 448x448: 32x32 patches, 256 image tokens.
- checkpoint (inference.py): ``HPSv3.safetensors`` (hub MizzenAI/HPSv3) loaded with
  ``load_state_dict(strict=True)`` into the whole reward model; a ``.pth`` with a ``"model"``
  entry is unwrapped. The HPSv3 environment pins transformers 4.45.2, whose Qwen2-VL keys are
  flat (``visual.*``, ``model.layers.*``, ``lm_head.*``); transformers >= 4.52 nests them
  (``model.visual.*``, ``model.language_model.*``). Both layouts are accepted here. That the
  released file uses the flat one is stated by third-party ports (e.g. Stella2211/hpsv3-4bit),
  not by HPSv3's own code: not confirmed here.

Not confirmed from the HPSv3 code: the chat template (HPSv3 uses the base processor's; it is read
from the local base folder here, and the tests use Qwen2-VL-7B-Instruct's published template) and
the key layout of the released HPSv3.safetensors (see above). Notes: qwen-vl-utils' smart_resize
(fetch_image's) and transformers' (the processor's) agree on every size tried (all multiples of 8
from 256 to 2048 per side), so the processor never resizes a second time; HPSv3's own
differentiable image processor (model/differentiable_image_processor.py) resizes bilinearly, but
on the official path it receives the image at its final size, so the resize that matters is
fetch_image's bicubic one, which is what is implemented here.

Implementation: transformers' ``Qwen2VLModel`` (vision tower + text decoder; the LM head is not
needed and not loaded), built from the base folder's ``config.json`` without allocating weights
and given the HPSv3 checkpoint's tensors. Only the base folder's config, tokenizer and chat
template are read: the HPSv3 checkpoint holds every weight. The tokenizer is loaded with
``AutoTokenizer`` (``AutoProcessor`` would also build Qwen2-VL's video processor, which needs
torchvision; only the processor's tokenizer and chat template are used). The image side runs on
tensors (``QwenVLImagePreprocess``) so the gradient reaches the image.
"""
from __future__ import annotations

import json
import math
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.rewards.base import ImageReward, resolve_weight_file
from engine.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize, resize

HPSV3_PIXELS = 256 * 28 * 28          # HPSv3's min_pixels = max_pixels
REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD = "<|image_pad|>"
CHECKPOINT_NAMES = ("HPSv3.safetensors", "HPSv3.pth", "HPSv3.pt", "HPSv3_7B.pth", "model.safetensors", "model.pth")
BASE_SUBDIRS = ("Qwen2-VL-7B-Instruct",)

# HPSv3's INSTRUCTION and prompt_with_special_token (hpsv3/dataset/data_collator_qwen.py), exact.
HPSV3_INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst "
    "and 10 being the best. \n\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) "
    "align with the textual description. The subject should match the description in terms of number, "
    "appearance, and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well "
    "the image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be "
    "acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.\n"
    "Textual prompt - {text_prompt}\n\n\n"
)
HPSV3_REWARD_PROMPT = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def hpsv3_text(prompt: str) -> str:
    """The user-message text HPSv3 pairs with the image for ``prompt``."""
    return HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_REWARD_PROMPT


# ---------------------------------------------------------------------------------------------
# Image side: Qwen2-VL's preprocessing on tensors

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = HPSV3_PIXELS,
                 max_pixels: int = HPSV3_PIXELS) -> tuple[int, int]:
    """qwen-vl-utils' ``smart_resize`` (the one HPSv3's ``fetch_image`` uses): sides rounded to
    multiples of ``factor``, scaled into [min_pixels, max_pixels] keeping the aspect ratio."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class QwenVLImagePreprocess:
    """Qwen2-VL's image preprocessing on (B, 3, H, W) tensors in [0, 1], differentiable.

    ``__call__`` gives ``(pixel_values, image_grid_thw)`` as transformers' ``Qwen2VLImageProcessor``
    does for a list of B images of that size: pixel_values (B * t * gh * gw, 3 * T * p * p) with
    each image's rows contiguous, in the 2x2 merge order (merge blocks row-major, then the m x m
    patches in a block row-major) and each row laid out (channel, temporal copy, py, px); a still
    image is one temporal patch (t = 1) holding T copies of the frame. image_grid_thw (B, 3) =
    [t, gh, gw] in patches.

    Resizing: bicubic with antialiasing to ``smart_resize``'s size (PIL's kernel; an image already
    at that size is untouched). ``clamp`` clips to [0, 1] after resizing as the 8-bit PIL path does;
    the remaining difference from it is PIL's 8-bit rounding.
    """

    min_pixels: int = HPSV3_PIXELS
    max_pixels: int = HPSV3_PIXELS
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    antialias: bool = True
    clamp: bool = True

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def tokens_per_image(self, height: int, width: int) -> int:
        """The number of ``<|image_pad|>`` tokens (merged patches) for an input of this size."""
        h, w = self.target_size(height, width)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size ** 2

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p, m, T = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = H // p, W // p
        x = x.reshape(B, C, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)                       # (B, gh/m, gw/m, m, m, C, p, p)
        x = x.unsqueeze(6).expand(*x.shape[:6], T, p, p)            # temporal copies after the channel
        return x.reshape(B * gh * gw, C * T * p * p)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        B, _, H, W = images.shape
        h, w = self.target_size(H, W)
        x = resize(images.float(), (h, w), "bicubic", self.antialias, self.clamp)
        x = normalize(x, self.mean, self.std)
        grid = torch.tensor([[1, h // self.patch_size, w // self.patch_size]] * B, dtype=torch.long,
                            device=images.device)
        return self.patchify(x), grid


# ---------------------------------------------------------------------------------------------
# Loading

def resolve_checkpoint(path) -> Path:
    """The HPSv3 checkpoint file: ``path`` itself, or the first of ``CHECKPOINT_NAMES`` in the folder ``path``."""
    return resolve_weight_file(path, CHECKPOINT_NAMES, "HPSv3 checkpoint")


def resolve_base(path, base=None) -> Path:
    """The local Qwen2-VL-7B-Instruct folder (config.json, tokenizer, chat template): ``base`` if
    given, else the checkpoint's folder if it holds a config.json, else its ``Qwen2-VL-7B-Instruct/``."""
    if base is not None:
        b = Path(base)
        if not b.is_dir():
            raise FileNotFoundError(f"Qwen2-VL base model folder not found: {b}")
    else:
        p = Path(path)
        folder = p if p.is_dir() else p.parent
        candidates = [folder, *(folder / s for s in BASE_SUBDIRS)]
        found = [c for c in candidates if (c / "config.json").is_file()]
        if not found:
            raise FileNotFoundError(f"Qwen2-VL base model folder not found: none of {[str(c) for c in candidates]} "
                                    "holds a config.json; pass base= (a local Qwen2-VL-7B-Instruct folder)")
        b = found[0]
    if not (b / "config.json").is_file():
        raise FileNotFoundError(f"Qwen2-VL base model folder {b} has no config.json: {b / 'config.json'}")
    if not ((b / "tokenizer.json").is_file() or ((b / "vocab.json").is_file() and (b / "merges.txt").is_file())):
        raise FileNotFoundError(f"Qwen2-VL base model folder {b} has no tokenizer: expected {b / 'tokenizer.json'} "
                                f"or {b / 'vocab.json'} + {b / 'merges.txt'}")
    return b


def _torch_load(p: Path):
    try:
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:   # a legacy (non-zip) file cannot be memory-mapped
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise RuntimeError(f"{p} holds objects other than tensors and cannot be read with weights_only=True; "
                           "re-save its state dict (e.g. with safetensors) from a trusted environment") from e


def load_checkpoint(path) -> dict[str, torch.Tensor]:
    """The HPSv3 state dict, without its LM head (the reward reads hidden states), from a
    ``.safetensors`` file or a ``.pt`` / ``.pth`` / ``.bin`` read with ``weights_only=True`` (a
    ``"model"`` or ``"state_dict"`` entry is unwrapped, a DDP ``module.`` prefix stripped)."""
    p = resolve_checkpoint(path)
    if p.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(p), framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("lm_head.")}
    else:
        sd = _torch_load(p)
        for key in ("model", "state_dict"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{p} does not hold a state dict (got {type(sd).__name__})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.startswith("lm_head.")}


def split_checkpoint(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(Qwen2VLModel state dict, reward-head state dict) from an HPSv3 state dict in either
    transformers layout; the LM head is dropped (the reward reads hidden states)."""
    backbone, head = {}, {}
    for k, v in sd.items():
        if k.startswith("rm_head."):
            head[k[len("rm_head."):]] = v
        elif k.startswith("lm_head."):
            continue
        elif k.startswith("model.visual.") or k.startswith("model.language_model."):
            backbone[k[len("model."):]] = v                          # transformers >= 4.52
        elif k.startswith("visual."):
            backbone[k] = v                                         # transformers < 4.52 (HPSv3's 4.45.2)
        elif k.startswith("model."):
            backbone["language_model." + k[len("model."):]] = v
        else:
            backbone[k] = v                                         # reported as unexpected below
    return backbone, head


def build_head(head: dict[str, torch.Tensor]) -> nn.Module:
    """HPSv3's ``rm_head`` from its tensors: ``"ranknet"`` without kwargs (HPSv3_7B: Linear, ReLU,
    Dropout, Linear, ReLU, Linear as keys 0 / 3 / 5) or ``"default"`` (one Linear, no bias)."""
    if set(head) == {"weight"}:
        w = head["weight"]
        module = nn.Linear(w.shape[1], w.shape[0], bias=False)
    elif set(head) == {f"{i}.{n}" for i in (0, 3, 5) for n in ("weight", "bias")}:
        (o0, i0), (o3, i3), (o5, i5) = (tuple(head[f"{i}.weight"].shape) for i in (0, 3, 5))
        if i3 != o0 or i5 != o3:
            raise ValueError(f"rm_head layer shapes do not chain: {[(o0, i0), (o3, i3), (o5, i5)]}")
        module = nn.Sequential(nn.Linear(i0, o0), nn.ReLU(), nn.Dropout(0.05), nn.Linear(i3, o3), nn.ReLU(),
                               nn.Linear(i5, o5))
    else:
        raise NotImplementedError(f"unknown HPSv3 reward-head layout (rm_head keys {sorted(head)}); implemented: "
                                  "'ranknet' without rm_head_kwargs (HPSv3_7B) and 'default'")
    module.load_state_dict({k: v.float() for k, v in head.items()}, strict=True)
    return module.float()


@contextmanager
def _parameters_on_meta():
    """Build modules with each parameter moved to the meta device as it is registered (no model-sized
    allocation, no random init) while buffers - the rotary inverse frequencies - are computed for real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16") from None


def load_qwen2vl(base: Path, backbone: dict[str, torch.Tensor], attn_implementation: str = "sdpa"):
    """transformers' ``Qwen2VLModel`` configured from ``base``/config.json with its vocabulary
    sized to the checkpoint's embedding, holding the checkpoint's tensors (strict)."""
    from transformers import AutoConfig, Qwen2VLModel

    config = AutoConfig.from_pretrained(str(base), local_files_only=True, attn_implementation=attn_implementation)
    if getattr(config, "model_type", None) != "qwen2_vl":
        raise ValueError(f"{base / 'config.json'} is a {getattr(config, 'model_type', None)!r} config, not qwen2_vl "
                         "(HPSv3's base is Qwen2-VL-7B-Instruct)")
    emb = backbone.get("language_model.embed_tokens.weight")
    if emb is None:
        raise RuntimeError("HPSv3 checkpoint has no token embedding (model.embed_tokens.weight / "
                           "model.language_model.embed_tokens.weight)")
    text_config = config.get_text_config()
    text_config.vocab_size = int(emb.shape[0])   # HPSv3 resized the embedding to len(tokenizer)
    with _parameters_on_meta():
        model = Qwen2VLModel(config)
    own = model.state_dict()
    missing = sorted(set(own) - set(backbone))
    unexpected = sorted(set(backbone) - set(own))
    bad_shape = [f"{k} {tuple(backbone[k].shape)} != {tuple(own[k].shape)}" for k in sorted(set(own) & set(backbone))
                 if tuple(backbone[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        raise RuntimeError(f"HPSv3 checkpoint does not match the Qwen2-VL model of {base / 'config.json'}: "
                           f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                           f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, "
                           f"shape {bad_shape[:8]}")
    model.load_state_dict(backbone, strict=True, assign=True)
    return model, config


def _chat_template(tokenizer, base: Path) -> str:
    for f in ("chat_template.json", "chat_template.jinja"):
        p = base / f
        if p.is_file():  # the processor's template (what HPSv3's processor.apply_chat_template uses)
            return json.loads(p.read_text())["chat_template"] if f.endswith(".json") else p.read_text()
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise FileNotFoundError(f"no chat template in {base}: expected {base / 'chat_template.json'}, "
                            f"{base / 'chat_template.jinja'} or a chat_template in tokenizer_config.json")


# ---------------------------------------------------------------------------------------------
# The reward

class HPSv3Reward(ImageReward):
    """HPSv3's mu for (image, prompt) pairs, differentiable w.r.t. the image.

    Parameters
    path:       the HPSv3 checkpoint (``HPSv3.safetensors`` from the hub's MizzenAI/HPSv3, or a
                ``.pth`` / ``.pt`` state dict), or a folder holding one of ``CHECKPOINT_NAMES``.
    base:       the local Qwen2-VL-7B-Instruct folder (config.json, tokenizer files, chat template;
                its weights are not read). None: the checkpoint's folder if it holds config.json,
                else its ``Qwen2-VL-7B-Instruct/`` subfolder.
    dtype:      the backbone's dtype (HPSv3 runs bfloat16); the reward head stays float32.
    min_pixels, max_pixels: the image-size budget (HPSv3: both 256 * 28 * 28, i.e. 448x448 for squares).
    grad_checkpointing: recompute the vision and decoder blocks in backward (saves memory for 7B).
    """

    def __init__(self, path, base=None, dtype="bfloat16", min_pixels: int = HPSV3_PIXELS,
                 max_pixels: int = HPSV3_PIXELS, grad_checkpointing: bool = False, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers import AutoTokenizer

        ckpt = resolve_checkpoint(path)
        base = resolve_base(path, base)
        tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True, padding_side="right")
        chat_template = _chat_template(tokenizer, base)
        if REWARD_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        backbone, head = split_checkpoint(load_checkpoint(ckpt))
        self.model, config = load_qwen2vl(base, backbone, attn_implementation)
        del backbone
        self.rm_head = build_head(head)
        # floating buffers too (the rotary inverse frequencies), as HPSv3's model.to(torch.bfloat16) did
        self.model.to(_dtype(dtype))

        n_rows = self.model.language_model.embed_tokens.num_embeddings
        if len(tokenizer) != n_rows:
            raise ValueError(f"the tokenizer of {base} with {REWARD_TOKEN} has {len(tokenizer)} tokens but the HPSv3 "
                             f"checkpoint's embedding has {n_rows} rows (HPSv3 resized it to len(tokenizer)): "
                             "wrong base folder?")
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.reward_token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_token_id = int(config.image_token_id)
        if tokenizer.convert_tokens_to_ids(IMAGE_PAD) != self.image_token_id:
            raise ValueError(f"{IMAGE_PAD} is id {tokenizer.convert_tokens_to_ids(IMAGE_PAD)} in the tokenizer of "
                             f"{base} but image_token_id={self.image_token_id} in its config.json")
        v = config.vision_config
        self.preprocess = QwenVLImagePreprocess(min_pixels=int(min_pixels), max_pixels=int(max_pixels),
                                                patch_size=int(v.patch_size), merge_size=int(v.spatial_merge_size),
                                                temporal_patch_size=int(v.temporal_patch_size))
        self.grad_checkpointing = bool(grad_checkpointing)
        if self.grad_checkpointing:
            if float(getattr(config.get_text_config(), "attention_dropout", 0.0) or 0.0) != 0.0:
                raise ValueError("grad_checkpointing needs attention_dropout == 0 (the blocks run in training mode)")
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):   # transformers >= 5.x's name
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        super().train(False)   # a reward model stays in eval mode
        if getattr(self, "grad_checkpointing", False):
            # transformers checkpoints a block only when the block's own `training` flag is set; the
            # flag is set on the block alone (its submodules stay in eval; the blocks have no dropout).
            from transformers.modeling_layers import GradientCheckpointingLayer
            for m in self.model.modules():
                if isinstance(m, GradientCheckpointingLayer):
                    m.training = True
        return self

    # -- text side --------------------------------------------------------------------------
    def texts(self, prompts: list[str], n_image_tokens: int) -> list[str]:
        """The chat-formatted inputs, ``<|image_pad|>`` expanded to the image's token count."""
        out = []
        for prompt in prompts:
            messages = [{"role": "user", "content": [
                {"type": "image", "min_pixels": self.preprocess.min_pixels, "max_pixels": self.preprocess.max_pixels},
                {"type": "text", "text": hpsv3_text(prompt)}]}]
            text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
            if text.count(IMAGE_PAD) != 1:
                raise ValueError(f"expected one {IMAGE_PAD} in the chat-formatted input, got {text.count(IMAGE_PAD)} "
                                 f"(prompt {prompt!r})")
            out.append(text.replace(IMAGE_PAD, IMAGE_PAD * n_image_tokens))
        return out

    def tokenize(self, prompts: list[str], n_image_tokens: int, device) -> tuple[torch.Tensor, ...]:
        """(input_ids, attention_mask, reward-token position) for each prompt, right-padded."""
        enc = self.tokenizer(self.texts(prompts, n_image_tokens), padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        is_reward = ids == self.reward_token_id
        if not bool((is_reward.sum(1) == 1).all()):
            raise ValueError(f"each input must hold exactly one {REWARD_TOKEN} token, got {is_reward.sum(1).tolist()} "
                             "(a prompt containing that text?)")
        if not bool(((ids == self.image_token_id).sum(1) == n_image_tokens).all()):
            raise ValueError(f"each input must hold {n_image_tokens} {IMAGE_PAD} tokens "
                             "(a prompt containing that text?)")
        return ids.to(device), mask.to(device), is_reward.int().argmax(1).to(device)

    # -- score --------------------------------------------------------------------------------
    def mu_sigma(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The reward head's (B, 2) output (mu, sigma) for the batch."""
        B, _, H, W = images.shape
        pixels, grid = self.preprocess(images)
        n_tokens = self.preprocess.tokens_per_image(H, W)
        ids, mask, pos = self.tokenize(prompts, n_tokens, images.device)

        visual = self.model.visual
        out = visual(pixels.to(visual.get_dtype()), grid_thw=grid)
        image_embeds = out.pooler_output if hasattr(out, "pooler_output") else out   # 5.x output / 4.x tensor
        embed = self.model.language_model.embed_tokens
        L = int(pos.max()) + 1                           # causal: later tokens cannot change the reward token
        ids, mask = ids[:, :L], mask[:, :L]
        with torch.no_grad():
            embeds = embed(ids)
        image_mask = (ids == self.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
        # HPSv3 calls the decoder with position_ids=None: arange(L) for all three M-RoPE sections
        position_ids = torch.arange(L, device=ids.device).view(1, 1, L).expand(3, B, L)
        hidden = self.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                           use_cache=False).last_hidden_state
        h = hidden[torch.arange(B, device=hidden.device), pos]
        return self.rm_head(h.float())

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.mu_sigma(images, prompts)[:, 0]
