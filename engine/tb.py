"""TensorBoard logging of a run (``tensorboard: true``): per-step scalars, eval scores and the
before / after sample grids, into ``<output_dir>/tb``. Written by rank 0 only."""
from __future__ import annotations

import numbers
from pathlib import Path

import torch


def require() -> None:
    """Fail at start-up, not after the first hours of training, when the package is missing."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it, and says so less plainly)
    except ImportError:
        raise ImportError("tensorboard=true needs the 'tensorboard' package: pip install tensorboard "
                          "(or pip install -e '.[tb]'), or set tensorboard=false") from None


class TBLogger:
    def __init__(self, log_dir: str | Path):
        require()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, prefix: str, metrics: dict, step: int) -> None:
        """Every number in ``metrics`` as ``prefix/key``; flags, strings, lists and nested
        dicts (a judge's per-kind table) are left to metrics.jsonl / summary.json."""
        for key, val in metrics.items():
            if isinstance(val, numbers.Real) and not isinstance(val, bool):
                self.writer.add_scalar(f"{prefix}/{key}", float(val), step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """(B, 3, H, W) in [0, 1], shown as one grid."""
        self.writer.add_images(tag, images.detach().float().clamp(0, 1).cpu(), step, dataformats="NCHW")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
