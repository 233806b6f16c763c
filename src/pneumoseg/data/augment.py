"""Training augmentations: an albumentations 2.x pipeline built from the ``augment`` config section.

The section lists ``{name, params}`` blocks, applied in order to the image and its mask. ``name`` is any
albumentations transform (``HorizontalFlip``, ``Affine``, ``RandomBrightnessContrast``, ``ElasticTransform``, ...)
or a composition (``OneOf``, ``SomeOf``, ``Sequential``) whose ``params.transforms`` is again a list of blocks::

    augment:
      transforms:
        - {name: HorizontalFlip, params: {p: 0.5}}
        - name: OneOf
          params:
            p: 0.3
            transforms:
              - {name: ElasticTransform, params: {alpha: 120, sigma: 6}}
              - {name: GridDistortion}

Parameters are those of albumentations 2.x; deprecated ones (``ShiftScaleRotate``, ``alpha_affine``,
``value``/``mask_value``, ``var_limit``, ...) make albumentations warn, and the tests turn its warnings into errors.

Besides albumentations' own, two transforms are registered (see ``benchmarks/bench_loader.py`` for their costs):

* ``CoarseElasticTransform`` (below): ``ElasticTransform`` with the same parameters and statistics, its
  displacement field drawn on a grid ``sigma / 2`` pixels apart and upsampled, about ten times cheaper at 512 px;
* ``FusedGeometric`` (:mod:`pneumoseg.data.fused_geometric`): its ``params.transforms`` (``Affine``, elastic,
  grid and optical distortions, or a ``OneOf`` of them) applied in order with one resampling of image and mask.

Randomness: each sample is augmented with its own seed (see :func:`augment`), so a sample's augmentation depends
only on the run's seed, the epoch and its position in the epoch, not on DataLoader workers or on a resume.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, cast

import albumentations as A
import cv2
import numpy as np
from albumentations.core.composition import BaseCompose
from albumentations.core.transforms_interface import BasicTransform
from omegaconf import DictConfig, OmegaConf

from pneumoseg.data.fused_geometric import FusedGeometric, coarse_elastic_fields
from pneumoseg.errors import ConfigError
from pneumoseg.registry import Registry

TRANSFORMS: Registry = Registry("augmentation")
for _name, _cls in sorted(vars(A).items()):
    if isinstance(_cls, type) and issubclass(_cls, (BasicTransform, BaseCompose)) and not _name.startswith("_"):
        TRANSFORMS.add(_name, _cls)


@TRANSFORMS.register("CoarseElasticTransform")
class CoarseElasticTransform(A.ElasticTransform):
    """``ElasticTransform`` whose displacement field is computed at a lower resolution and upsampled
    (:func:`pneumoseg.data.fused_geometric.coarse_elastic_fields`: same statistics, the noise and the blur, most
    of the full-resolution transform's cost, ``(sigma / 2)**2`` times cheaper). Parameters are
    ``ElasticTransform``'s; image and mask go through the same remap (the mask with ``mask_interpolation``).
    """

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        fields = coarse_elastic_fields(self, (height, width))
        dx, dy = (cv2.resize(field, (width, height), interpolation=cv2.INTER_LINEAR) for field in fields)
        return {
            "map_x": dx + np.arange(width, dtype=np.float32),
            "map_y": dy + np.arange(height, dtype=np.float32)[:, None],
        }


TRANSFORMS.add("FusedGeometric", FusedGeometric)

COMPOSITIONS = ("OneOf", "SomeOf", "Sequential", "SelectiveChannelTransform")
WITH_MEMBERS = (*COMPOSITIONS, "FusedGeometric")  # blocks whose params.transforms are blocks


def build_transform(block: Mapping[str, Any]) -> A.BasicTransform | BaseCompose:
    """One transform from a ``{name, params}`` block; a composition's ``params.transforms`` is built recursively."""
    if isinstance(block, DictConfig):
        block = cast(dict, OmegaConf.to_container(block, resolve=True))
    params = dict(block.get("params") or {})
    if block.get("name") in WITH_MEMBERS:
        params["transforms"] = [build_transform(child) for child in params.get("transforms") or []]
    elif "transforms" in params:
        raise ConfigError(
            f"augmentation {block.get('name')!r} is not a composition; only {WITH_MEMBERS} take 'transforms'"
        )
    try:
        return TRANSFORMS.build({"name": block.get("name"), "params": params})
    except ValueError as exc:  # albumentations validates parameters with pydantic (ValidationError is a ValueError)
        raise ConfigError(f"augmentation {block.get('name')!r}: bad params {params}: {exc}") from None


def build_augment(section: Mapping[str, Any] | DictConfig | None) -> A.Compose | None:
    """The training pipeline of the ``augment`` section (``{transforms: [blocks]}``); None when it lists none."""
    if isinstance(section, DictConfig):
        section = cast(dict, OmegaConf.to_container(section, resolve=True))
    blocks = (section or {}).get("transforms") or []
    if not blocks:
        return None
    return A.Compose([build_transform(block) for block in blocks])


def augment(
    pipeline: A.Compose | None, image: np.ndarray, mask: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``pipeline`` to an 8-bit image and its mask with the random state of ``seed``.

    A shared numpy Generator and Python Random are handed to every transform: far cheaper than reseeding each.
    """
    if pipeline is None:
        return image, mask
    pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
    out = pipeline(image=image, mask=mask)
    return out["image"], out["mask"]
