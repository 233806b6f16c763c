"""Test-time augmented probabilities of trained fold models (loaded by :mod:`pneumoseg.inference.fold_models`).

Used by training (out-of-fold predictions), stage 05 (the test set) and the server, so test-time augmentation
(TTA) is implemented here once. A view of an image is a flip (none, horizontal, vertical) at a scale; the
probabilities of every view of every model are averaged::

    models = load_fold_models(train_dir, device="cpu")          # pneumoseg.inference.fold_models
    probs = predict_probs(models, images, TTA(hflip=True))      # images: N x S x S uint8 -> N x S x S float32

The ``tta`` config section (``{hflip, vflip, scales}``) builds a :class:`TTA` with :meth:`TTA.from_config`.

Models with the image-level gate head also give each image a gate probability (:func:`predict_with_gate`): a flip
or a rescale does not change whether an image has a pneumothorax, so it is averaged over the same views and
models as the maps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pneumoseg.inference.fold_models import FoldModel
from pneumoseg.modeling.device import autocast
from pneumoseg.modeling.models import split_output

# smp encoders downsample by up to 2**5; a rescaled view must keep its sides divisible by that.
SIZE_MULTIPLE = 32


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: which flips, at which scales (1.0 = the model's size)."""

    hflip: bool = True
    vflip: bool = False
    scales: tuple[float, ...] = field(default=(1.0,))

    @classmethod
    def from_config(cls, block: Mapping | DictConfig | None) -> TTA:
        """From a ``tta`` section ``{hflip, vflip, scales}``; None means no augmentation."""
        if block is None:
            return cls(hflip=False)
        if isinstance(block, DictConfig):
            block = cast(dict, OmegaConf.to_container(block, resolve=True))
        return cls(
            hflip=bool(block.get("hflip", True)),
            vflip=bool(block.get("vflip", False)),
            scales=tuple(float(s) for s in block.get("scales") or (1.0,)),
        )

    def views(self) -> list[tuple[tuple[int, ...], float]]:
        """``(flip dims, scale)`` of every view: each scale unflipped, plus each enabled flip."""
        flips = [()] + [(-1,)] * self.hflip + [(-2,)] * self.vflip
        return [(dims, scale) for scale in self.scales for dims in flips]


def _view_probs(
    net: nn.Module, x: torch.Tensor, dims: tuple[int, ...], scale: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sigmoid probabilities (B x H x W, float32) of one view of ``x``, mapped back onto the original pixels, and
    the gate's (B, float32; None without the head)."""
    height, width = x.shape[-2:]
    view = torch.flip(x, dims) if dims else x
    if scale != 1.0:
        size = [max(SIZE_MULTIPLE, round(side * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE) for side in (height, width)]
        view = F.interpolate(view, size=size, mode="bilinear", align_corners=False)
    logits, gate = split_output(net(view))
    logits = logits[:, 0:1].float()
    if scale != 1.0:
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    if dims:
        logits = torch.flip(logits, dims)
    return torch.sigmoid(logits[:, 0]), None if gate is None else torch.sigmoid(gate.float())


def predict_probs(
    models: Sequence[FoldModel],
    images: np.ndarray | torch.Tensor,
    tta: TTA | None = None,
    batch_size: int = 16,
    amp: str | None = "auto",
) -> np.ndarray:
    """Average probability maps of ``models`` over the views of ``tta``.

    Args:
        models: loaded fold models, all on the same device and trained at the size of ``images``.
        images: uint8 grey images, N x S x S (or one S x S image).
        tta: the views to average; None predicts the plain image only.
        batch_size: images per forward pass.
        amp: autocast on a GPU (see :func:`pneumoseg.modeling.device.autocast`); ignored on the CPU.

    Returns:
        float32 probabilities, N x S x S (or S x S for one image).
    """
    return predict_with_gate(models, images, tta, batch_size, amp)[0]


def predict_with_gate(
    models: Sequence[FoldModel],
    images: np.ndarray | torch.Tensor,
    tta: TTA | None = None,
    batch_size: int = 16,
    amp: str | None = "auto",
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`predict_probs` (same arguments), and each image's gate probability averaged over the views of the
    models that have the gate head.

    Returns:
        ``(probs, gates)``: the maps as :func:`predict_probs` gives them, and float32 gate probabilities (N, or a
        scalar for one image); ``gates`` is None when no model has the head.
    """
    if not models:
        raise ValueError("predict_probs needs at least one model")
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(np.ascontiguousarray(images))
    single = images.ndim == 2
    if single:
        images = images[None]
    device = next(models[0].net.parameters()).device
    views = (tta or TTA(hflip=False)).views()
    out = np.empty(tuple(images.shape), dtype=np.float32)
    gates = np.zeros(len(images), dtype=np.float32)
    gated_models = 0
    with torch.inference_mode(), autocast(device, amp):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device, non_blocking=True)
            total = torch.zeros(batch.shape, dtype=torch.float32, device=device)
            gate_total = torch.zeros(len(batch), dtype=torch.float32, device=device)
            gated_models = 0
            for model in models:
                x = model.normalize(batch)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                for dims, scale in views:
                    probs, gate = _view_probs(model.net, x, dims, scale)
                    total += probs
                    if gate is not None:
                        gate_total += gate
                gated_models += gate is not None
            out[start : start + len(batch)] = (total / (len(models) * len(views))).cpu().numpy()
            if gated_models:
                gates[start : start + len(batch)] = (gate_total / (gated_models * len(views))).cpu().numpy()
    found = gates if gated_models else None
    if single:
        return out[0], None if found is None else found[0]
    return out, found
