"""Test images shared by the reward tests."""
import numpy as np
import torch


def smooth_image(h, w, seed=0):
    """A smooth uint8 RGB image (h, w, 3), like a decoded generation rather than noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    ph = rng.uniform(0, 3, 3)
    img = np.stack([np.sin(6 * xx + ph[0]), np.cos(5 * yy + ph[1]), np.sin(4 * (xx + yy) + ph[2])], -1) * 0.4 + 0.5
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def to_tensor(arr):
    """(h, w, 3) uint8 (or a PIL image) -> (1, 3, h, w) float in [0, 1]."""
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1)[None].float() / 255.0
