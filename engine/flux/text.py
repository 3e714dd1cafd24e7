"""Prompt encoding with a Flux folder's own text encoders (CLIP for the pooled vector, T5 for
the sequence), through diffusers' ``FluxPipeline.encode_prompt``."""
from __future__ import annotations

import os

import torch


class PipelineTextEncoder:
    def __init__(self, path: str, dtype: torch.dtype = torch.bfloat16, device="cpu", max_sequence_length: int = 512):
        from diffusers import FluxPipeline

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"missing model folder: {path}")
        # diffusers' own message for a missing model_index.json names the folder, not the file
        index = os.path.join(path, "model_index.json")
        if not os.path.isfile(index):
            raise FileNotFoundError(f"missing pipeline index: {index}")
        for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            if not os.path.isdir(os.path.join(path, sub)):
                raise FileNotFoundError(f"missing text-encoder folder: {os.path.join(path, sub)}")
        self.device = torch.device(device)
        self.max_sequence_length = max_sequence_length
        # transformer and VAE are loaded separately by the adapter; only the encoders here
        self.pipe = FluxPipeline.from_pretrained(path, transformer=None, vae=None, torch_dtype=dtype,
                                                 local_files_only=True).to(self.device)

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> prompt_embeds (B, max_sequence_length, T5 width), pooled (B, CLIP width)."""
        if isinstance(prompts, str):  # list("a cat") would be five one-letter prompts
            prompts = [prompts]
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)
        return prompt_embeds, pooled
