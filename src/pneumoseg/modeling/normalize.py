"""How 8-bit grey images become a model's input tensor: one definition for training, prediction and serving."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Normalize:
    """How 8-bit images become model inputs: ``(pixel / 255 - mean) / std``, repeated over ``channels``."""

    mean: float = 0.449
    std: float = 0.226
    channels: int = 1

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images, H x W or N x H x W (numpy or torch) -> float32 tensor (C x H x W or N x C x H x W)."""
        images = torch.as_tensor(images)
        channel_dim = images.ndim - 2
        scaled = (images.float() / 255.0 - self.mean) / self.std
        scaled = scaled.unsqueeze(channel_dim)
        return scaled.expand(*scaled.shape[:channel_dim], self.channels, *scaled.shape[channel_dim + 1 :])


def normalize_from_model(block) -> Normalize:
    """The :class:`Normalize` of a ``model`` config block (its ``normalize`` and ``params.in_channels``)."""
    settings = dict(block.get("normalize") or {})
    channels = int((block.get("params") or {}).get("in_channels", 3))
    return Normalize(mean=float(settings.get("mean", 0.449)), std=float(settings.get("std", 0.226)), channels=channels)
