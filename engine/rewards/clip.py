"""CLIP score with a local transformers ``CLIPModel`` folder, differentiable w.r.t. the image.

Score: the cosine of the normalised image and text embeddings (by default), or CLIPScore's
``w * max(cos, 0)`` with ``w=2.5, clamp=True`` (Hessel et al. 2021). The plain cosine is the
default because the clamp has no gradient where the cosine is negative.

``HFCLIPReward`` is shared with PickScore: it loads the model and the processor from local
folders only (``local_files_only=True``; a missing folder or file raises FileNotFoundError naming
it) and rebuilds the processor's image preprocessing (resize the shortest edge with bicubic,
centre crop, normalise) on tensors. Features come from the towers and their projections directly
(``vision_model(...).pooler_output`` -> ``visual_projection``), which transformers 4.x and 5.x share.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.rewards.base import ImageReward
from engine.rewards.preprocess import ImagePreprocess

_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling ids


def _require_dir(path, what: str, files=("config.json",)) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {p}")
    for f in files:
        if not (p / f).is_file():
            raise FileNotFoundError(f"{what} folder {p} has no {f}: {p / f}")
    return p


def _require_weights(p: Path) -> None:
    names = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    if not any((p / n).is_file() for n in names):
        raise FileNotFoundError(f"no model weights in {p}: expected one of {[str(p / n) for n in names]}")


def _size_dict(size, int_means: str) -> dict:
    """A processor's size as a plain dict without None entries (transformers 5 uses a SizeDict
    dataclass, 4.x a dict; an int is a shortest edge for ``size``, a square for ``crop_size``)."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"shortest_edge": size} if int_means == "shortest_edge" else {"height": size, "width": size}
    if dataclasses.is_dataclass(size):
        size = dataclasses.asdict(size)
    return {k: v for k, v in dict(size).items() if v is not None}


def preprocess_from_processor(image_processor) -> ImagePreprocess:
    """The tensor preprocessing equivalent to a transformers ``CLIPImageProcessor``'s settings."""
    ip = image_processor
    size = _size_dict(getattr(ip, "size", None), "shortest_edge")
    crop = _size_dict(getattr(ip, "crop_size", None), "square")
    resample = getattr(ip, "resample", 3)
    interpolation = _RESAMPLE.get(int(resample), None) if resample is not None else "bicubic"
    if interpolation is None:
        raise NotImplementedError(f"image processor resample={resample!r}: only bilinear and bicubic are implemented")
    do_resize, do_crop = getattr(ip, "do_resize", True), getattr(ip, "do_center_crop", True)
    if do_crop and crop:
        out = (int(crop["height"]), int(crop["width"]))
    elif "height" in size:
        out = (int(size["height"]), int(size["width"]))
    else:
        raise NotImplementedError(f"image processor without a fixed output size (size={size}, crop_size={crop})")
    if not do_resize:
        raise NotImplementedError("image processor with do_resize=False")
    if "shortest_edge" in size:
        mode, resize_to = "shortest_crop", int(size["shortest_edge"])
    elif "height" in size and (int(size["height"]), int(size["width"])) == out:
        mode, resize_to = "stretch", None
    else:
        raise NotImplementedError(f"image processor size={size} with crop_size={crop}")
    if getattr(ip, "do_normalize", True):
        mean, std = tuple(ip.image_mean), tuple(ip.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return ImagePreprocess(size=out, mean=mean, std=std, mode=mode, resize_to=resize_to,
                           interpolation=interpolation, antialias=True, clamp=True, crop_offset="floor")


class HFCLIPReward(ImageReward):
    """Base for rewards on a transformers ``CLIPModel``: ``cosine(image, text)`` and the
    logit scale, loaded from local folders; subclasses turn them into the score."""

    def __init__(self, path, processor_path=None, what: str = "CLIP model"):
        super().__init__()
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        model_dir = _require_dir(path, what)
        _require_weights(model_dir)
        proc_dir = _require_dir(processor_path if processor_path is not None else path, f"{what} processor",
                                files=("preprocessor_config.json",))
        self.model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(proc_dir), local_files_only=True)
        image_processor = CLIPImageProcessor.from_pretrained(str(proc_dir), local_files_only=True)
        self.preprocess = preprocess_from_processor(image_processor)
        self.max_length = min(int(self.model.config.text_config.max_position_embeddings),
                              int(getattr(self.tokenizer, "model_max_length", 77) or 77))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # a reward model stays in eval mode

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.model.visual_projection.weight.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    def text_features(self, prompts: list[str], device) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        with torch.no_grad():
            pooled = self.model.text_model(input_ids=tok["input_ids"].to(device),
                                           attention_mask=tok["attention_mask"].to(device)).pooler_output
            return F.normalize(self.model.text_projection(pooled), dim=-1)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.image_features(images) * self.text_features(prompts, images.device)).sum(-1).float()


class CLIPScoreReward(HFCLIPReward):
    """``w * cos`` (defaults: w = 1, no clamp: the plain cosine); ``w=2.5, clamp=True`` is CLIPScore.

    path: a local transformers CLIPModel folder (e.g. openai/clip-vit-large-patch14), which also
    holds the processor unless ``processor_path`` names another folder."""

    def __init__(self, path, processor_path=None, w: float = 1.0, clamp: bool = False):
        super().__init__(path, processor_path, what="CLIP model")
        self.w, self.clamp = float(w), bool(clamp)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = self.cosine(images, prompts)
        return self.w * (cos.clamp_min(0.0) if self.clamp else cos)
