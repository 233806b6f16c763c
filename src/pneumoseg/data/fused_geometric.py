"""One resampling for a chain of geometric augmentations: ``FusedGeometric``.

Applied one after the other, ``Affine`` and a distortion (``ElasticTransform``, ``GridDistortion``,
``OpticalDistortion``) each build a full-resolution coordinate map and resample the image and the mask with it:
at 512 px most of the loader's augmentation time. All of them move pixels smoothly, so their composition is a
smooth map too. :class:`FusedGeometric` draws each member's parameters with albumentations' own code (same
kinds, ranges and random draws as the members applied in order), composes the members' maps at the pixel
centres of a coarse grid (``step`` pixels apart; ``sigma / 2`` apart when an elastic member applies, whose field
varies over about ``sigma`` pixels), upsamples the composed displacement bilinearly and resamples image and mask
once with ``cv2.remap`` (``Affine`` members alone: their product, with one ``cv2.warpAffine``).

What differs from the members applied in order: one interpolation instead of one per member (sharper, not
blurrier); the composed map interpolated between points ``step`` pixels apart, and optical distortion maps
computed on that grid (sub-pixel differences inside the image, up to a few pixels at its outer edge); the border
handling, interpolation and fill of the fused transform instead of each member's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.geometric.functional import generate_displacement_fields
from albumentations.core.composition import BaseCompose

from pneumoseg.errors import ConfigError

ELASTIC = (A.ElasticTransform,)  # CoarseElasticTransform subclasses it
MAP_DISTORTIONS = (A.GridDistortion, A.OpticalDistortion)
FUSABLE = (A.Affine, *ELASTIC, *MAP_DISTORTIONS)


def coarse_elastic_fields(transform: A.ElasticTransform, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An elastic transform's displacement fields drawn on a grid ``sigma / 2`` pixels apart, in pixels of the
    full-resolution image of ``shape``.

    The field is Gaussian-blurred noise, so nothing of it varies over less than about ``sigma`` pixels: drawn on a
    grid ``step`` pixels apart (blur ``sigma / step``, scale ``alpha / step``, so that displacements keep their
    size in full-resolution pixels) and interpolated linearly, it has the same statistics, at ``step**2`` less
    cost for the noise and the blur.

    Args:
        transform: its ``alpha``, ``sigma``, ``same_dxdy``, ``approximate``, ``noise_distribution`` and random
            generator are used.
        shape: ``(height, width)`` of the full-resolution image.
    """
    height, width = shape
    step = max(1.0, transform.sigma / 2)
    coarse = (max(2, round(height / step)), max(2, round(width / step)))
    return generate_displacement_fields(
        coarse,
        transform.alpha / step,
        transform.sigma / step,
        transform.same_dxdy,
        (17, 17) if transform.approximate else (0, 0),
        transform.random_generator,
        transform.noise_distribution,
    )


def padded_centres(size: int, step: int) -> np.ndarray:
    """Coordinates of the centres of ``step``-pixel cells covering ``size`` pixels with one more cell on each
    side: resized ``step`` times, samples at these points cover every pixel of the image with no clamping at
    its borders (the first cell's centre lies left of pixel 0, the last one's right of pixel ``size - 1``)."""
    return ((np.arange(math.ceil(size / step) + 2) - 0.5) * step - 0.5).astype(np.float32)


def upsample(field: np.ndarray, shape: tuple[int, int], step: int) -> np.ndarray:
    """A field sampled at :func:`padded_centres` interpolated bilinearly at every pixel of an image of
    ``shape``."""
    rows, cols = field.shape
    return cv2.resize(field, (cols * step, rows * step), interpolation=cv2.INTER_LINEAR)[
        step : step + shape[0], step : step + shape[1]
    ]


def sample_field(field: np.ndarray, x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A coarse field covering an image of ``shape``, interpolated bilinearly at full-resolution points
    ``(x, y)``; beyond the outer cell centres it stays constant.

    Args:
        field: h x w float32 values at the centres of h x w equal cells of the image (where ``cv2.resize``
            places them).
        x, y: float32 arrays of full-resolution coordinates.
        shape: ``(height, width)`` of the full-resolution image.
    """
    rows, cols = field.shape
    column = (x + 0.5) * (cols / shape[1]) - 0.5
    row = (y + 0.5) * (rows / shape[0]) - 0.5
    return cv2.remap(field, column, row, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def optical_fields(
    transform: A.OpticalDistortion, shape: tuple[int, int], step: float
) -> tuple[np.ndarray, np.ndarray]:
    """An optical distortion's displacement, in full-resolution pixels, at the cell centres of a grid about
    ``step`` pixels apart.

    albumentations computes the map ``m(u) = D(u + 0.5)`` for an image of ``n`` pixels, where ``D`` is a radial
    distortion about ``n / 2`` in units of ``n``; computed for ``g`` coarse pixels and scaled by ``s = n / g``,
    ``s * m_g((u + 0.5) / s - 0.5)`` is exactly the full-resolution map at ``u``, so the displacement at coarse
    centre ``i`` is ``s * (m_g(i) - i - 0.5) + 0.5``.

    Args:
        transform: draws its coefficient with its own random state.
        shape: ``(height, width)`` of the full-resolution image.
        step: pixels between the grid's samples.
    """
    grid = tuple(max(2, math.ceil(side / step)) for side in shape)
    maps = transform.get_params_dependent_on_data({"shape": grid}, {})
    scale_x, scale_y = shape[1] / grid[1], shape[0] / grid[0]
    return (
        scale_x * (maps["map_x"] - np.arange(grid[1], dtype=np.float32) - 0.5) + 0.5,
        scale_y * (maps["map_y"] - np.arange(grid[0], dtype=np.float32)[:, None] - 0.5) + 0.5,
    )


def affine_pull(matrix: np.ndarray):
    """The function taking output points ``(x, y)`` of the affine map ``matrix`` (3 x 3, input to output, as
    ``cv2.warpAffine`` takes it) to the input points they come from."""
    inverse = cv2.invertAffineTransform(matrix[:2]).astype(np.float32)
    return lambda x, y: (
        inverse[0, 0] * x + inverse[0, 1] * y + inverse[0, 2],
        inverse[1, 0] * x + inverse[1, 1] * y + inverse[1, 2],
    )


class FusedGeometric(A.DualTransform):
    """Geometric augmentations applied in order with a single resampling (see the module docstring).

    Args:
        transforms: the members, in the order they apply: ``Affine`` (without ``fit_output``),
            ``ElasticTransform`` / ``CoarseElasticTransform``, ``GridDistortion``, ``OpticalDistortion``, or a
            ``OneOf`` of these; each applies with its own probability, as in a pipeline.
        step: pixels between the points where the composed map is computed, a whole number (elastic members:
            at most ``sigma / 2``, rounded); optical distortion maps are computed on this grid too.
        border_mode: OpenCV border mode of the one resampling (the members' defaults: ``BORDER_CONSTANT``).
        fill: the image's border value for ``BORDER_CONSTANT``; the mask's is 0. The image is interpolated
            bilinearly, the mask by nearest neighbour, as the members do by default.
        p: probability of considering the members at all.

    Raises:
        ConfigError: a member of another kind, a nested ``OneOf`` of anything else, ``Affine(fit_output=True)``
            (it changes the output's size), or a step below 1.
    """

    def __init__(
        self,
        transforms: Sequence[A.BasicTransform | BaseCompose],
        step: int = 8,
        border_mode: int = cv2.BORDER_CONSTANT,
        fill: float = 0,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        for member in transforms:
            for transform in member.transforms if isinstance(member, A.OneOf) else [member]:
                if not isinstance(transform, FUSABLE):
                    raise ConfigError(
                        f"FusedGeometric cannot fuse {type(transform).__name__}: its members are "
                        f"Affine, ElasticTransform, CoarseElasticTransform, GridDistortion, "
                        f"OpticalDistortion, or a OneOf of them"
                    )
                if isinstance(transform, A.Affine) and transform.fit_output:
                    raise ConfigError("FusedGeometric cannot fuse Affine(fit_output=True): it changes the size")
        if step < 1:
            raise ConfigError(f"FusedGeometric step must be at least 1 pixel, got {step}")
        self.transforms = list(transforms)
        self.step = int(step)
        self.border_mode = border_mode
        self.fill = fill

    def set_random_state(self, random_generator: np.random.Generator, py_random) -> None:
        super().set_random_state(random_generator, py_random)
        for member in self.transforms:
            member.set_random_state(random_generator, py_random)

    def _drawn(self) -> list[A.BasicTransform]:
        """The members that apply to this sample, in order, drawn as a pipeline would draw them."""
        drawn = []
        for member in self.transforms:
            if isinstance(member, A.OneOf):
                if member.transforms_ps and member.py_random.random() < member.p:
                    drawn.append(
                        member.transforms[
                            member.random_generator.choice(len(member.transforms), p=member.transforms_ps)
                        ]
                    )
            elif member.should_apply():
                drawn.append(member)
        return drawn

    def _pull(self, transform: A.BasicTransform, shape: tuple[int, int]):
        """``transform``'s parameters for this sample, as a function taking output points ``(x, y)`` to the
        points of its input they come from (full-resolution pixels); for ``Affine``, its 3 x 3 matrix."""
        if isinstance(transform, A.Affine):
            return np.asarray(transform.get_params_dependent_on_data({"shape": shape}, {})["matrix"], np.float64)
        if isinstance(transform, A.GridDistortion):
            # Its map is separable (map_x depends on x alone, map_y on y alone): exact at any point from one row
            # and one column, by linear interpolation as remap does.
            maps = transform.get_params_dependent_on_data({"shape": shape}, {})
            columns, rows = np.arange(shape[1], dtype=np.float32), np.arange(shape[0], dtype=np.float32)
            shift_x, shift_y = maps["map_x"][0] - columns, maps["map_y"][:, 0] - rows
            return lambda x, y: (
                x + np.interp(x, columns, shift_x).astype(np.float32),
                y + np.interp(y, rows, shift_y).astype(np.float32),
            )
        if isinstance(transform, ELASTIC):
            fields = coarse_elastic_fields(transform, shape)
        else:
            fields = optical_fields(transform, shape, self.step)
        dx, dy = (np.asarray(field, np.float32) for field in fields)
        return lambda x, y: (x + sample_field(dx, x, y, shape), y + sample_field(dy, x, y, shape))

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        shape = tuple(params["shape"][:2])
        drawn = self._drawn()
        pulls = [self._pull(transform, shape) for transform in drawn]
        if all(isinstance(pull, np.ndarray) for pull in pulls):
            # affine members alone (or none): their product is one affine map, for one warpAffine
            matrix = functools.reduce(lambda total, member: member @ total, pulls, np.eye(3))
            return {"matrix": matrix if pulls else None, "map_x": None, "map_y": None}
        pulls = [affine_pull(pull) if isinstance(pull, np.ndarray) else pull for pull in pulls]
        step = round(min([self.step] + [max(1.0, t.sigma / 2) for t in drawn if isinstance(t, ELASTIC)]))
        x0, y0 = np.meshgrid(padded_centres(shape[1], step), padded_centres(shape[0], step))
        x, y = x0, y0
        # out = last(...(first(image))): an output point comes from last's source point, pulled on to first's
        for pull in reversed(pulls):
            x, y = pull(x, y)
        map_x = upsample(x - x0, shape, step) + np.arange(shape[1], dtype=np.float32)
        map_y = upsample(y - y0, shape, step) + np.arange(shape[0], dtype=np.float32)[:, None]
        return {"matrix": None, "map_x": map_x, "map_y": map_y}

    def _resample(
        self,
        array: np.ndarray,
        interpolation: int,
        fill: float,
        matrix: np.ndarray | None,
        map_x: np.ndarray | None,
        map_y: np.ndarray | None,
    ) -> np.ndarray:
        if matrix is not None:
            return cv2.warpAffine(
                array,
                matrix[:2],
                array.shape[1::-1],
                flags=interpolation,
                borderMode=self.border_mode,
                borderValue=fill,
            )
        if map_x is None or map_y is None:
            return array
        return cv2.remap(array, map_x, map_y, interpolation, borderMode=self.border_mode, borderValue=fill)

    def apply(
        self,
        img: np.ndarray,
        matrix: np.ndarray | None,
        map_x: np.ndarray | None,
        map_y: np.ndarray | None,
        **params: Any,
    ) -> np.ndarray:
        return self._resample(img, cv2.INTER_LINEAR, self.fill, matrix, map_x, map_y)

    def apply_to_mask(
        self,
        mask: np.ndarray,
        matrix: np.ndarray | None,
        map_x: np.ndarray | None,
        map_y: np.ndarray | None,
        **params: Any,
    ) -> np.ndarray:
        return self._resample(mask, cv2.INTER_NEAREST, 0, matrix, map_x, map_y)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("step", "border_mode", "fill")
