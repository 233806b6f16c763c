"""FusedGeometric: Affine and the distortions of the base config composed into one resampling."""

import random

import cv2
import numpy as np
import pytest

from pneumoseg.data.augment import augment, build_augment
from pneumoseg.errors import ConfigError

SIZE = 128
AFFINE = {
    "name": "Affine",
    "params": {"scale": [0.9, 1.1], "translate_percent": [-0.0625, 0.0625], "rotate": [-10, 10], "p": 1.0},
}
MEMBERS = {
    "elastic": {"name": "CoarseElasticTransform", "params": {"alpha": 120, "sigma": 6.0, "p": 1.0}},
    "grid": {"name": "GridDistortion", "params": {"distort_limit": 0.3, "p": 1.0}},
    "optical": {"name": "OpticalDistortion", "params": {"distort_limit": 0.5, "p": 1.0}},
    "affine": AFFINE,
}


def fused(*members: dict) -> object:
    return build_augment({"transforms": [{"name": "FusedGeometric", "params": {"transforms": list(members)}}]})


def smooth_image(seed: int = 0) -> np.ndarray:
    """Smooth noise over the full grey range: every displacement changes it, none by a jump."""
    noise = np.random.default_rng(seed).random((SIZE, SIZE)).astype(np.float32)
    return cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 4), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def test_a_mask_drawn_from_the_image_stays_aligned():
    cells = (np.indices((SIZE, SIZE)) // 16).sum(axis=0) % 2  # a checkerboard of 16 px cells
    image = (cells * 200 + 30).astype(np.uint8)
    mask = (cells * 255).astype(np.uint8)
    for member in [*MEMBERS.values(), "all"]:
        pipeline = fused(*MEMBERS.values()) if member == "all" else fused(member)
        for seed in range(3):
            moved_image, moved_mask = augment(pipeline, image, mask, seed)
            assert not np.array_equal(moved_mask, mask)
            # only pixels on a cell's edge, where the image is interpolated and the mask is not, may differ
            assert np.mean((moved_image > 130) == (moved_mask > 127)) > 0.97, (member, seed)
            assert set(np.unique(moved_mask)) <= {0, 255}


@pytest.mark.parametrize("name", sorted(MEMBERS))
def test_each_member_alone_moves_pixels_as_the_library_transform_does(name):
    """Same random draws, same kinds and ranges: fused alone, a member gives what the library gives, up to
    the composed map's interpolation between points 8 px apart (1.5 grey levels on average). The outer 4 px
    are left out: albumentations' GridDistortion gives the image's last few pixels, beyond its last whole cell,
    a step of their own, a jump that no smooth map follows."""
    image, mask = smooth_image(), np.zeros((SIZE, SIZE), np.uint8)
    library, one = build_augment({"transforms": [MEMBERS[name]]}), fused(MEMBERS[name])
    inside = (slice(4, -4), slice(4, -4))
    for seed in range(3):
        expected = augment(library, image, mask, seed)[0].astype(float)
        assert np.abs(expected - image)[inside].mean() > 3  # the member does move pixels
        assert np.abs(augment(one, image, mask, seed)[0] - expected)[inside].mean() < 1.5


def test_members_apply_in_order():
    """Optical distortion then Affine, as the pipeline of the two would: and not the other way round."""
    optical = {"name": "OpticalDistortion", "params": {"distort_limit": [0.5, 0.5], "p": 1.0}}
    affine = {
        "name": "Affine",
        "params": {"scale": [1.1, 1.1], "translate_percent": [0.06, 0.06], "rotate": [10, 10], "p": 1.0},
    }
    image, mask = smooth_image(1), np.zeros((SIZE, SIZE), np.uint8)
    expected = augment(build_augment({"transforms": [optical, affine]}), image, mask, 0)[0].astype(float)
    reversed_order = augment(build_augment({"transforms": [affine, optical]}), image, mask, 0)[0]
    assert np.abs(expected - reversed_order).mean() > 5  # the order matters here
    assert np.abs(augment(fused(optical, affine), image, mask, 0)[0] - expected).mean() < 2.0


def fitted_affine(transform, seed: int) -> tuple[float, float, np.ndarray]:
    """Rotation (degrees), scale and translation (px) of the affine map closest to the transform's
    output-to-input map for one draw."""
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    params = transform.get_params_dependent_on_data({"shape": (SIZE, SIZE)}, {})
    y, x = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    points = np.stack([x.ravel(), y.ravel(), np.ones(x.size)], axis=1)
    if params["matrix"] is not None:  # Affine alone: one warpAffine with the input-to-output matrix
        forward = params["matrix"][:2]
    else:
        backward = np.linalg.lstsq(points, np.stack([params["map_x"].ravel(), params["map_y"].ravel()], 1), rcond=None)[
            0
        ].T
        forward = cv2.invertAffineTransform(backward)
    linear = forward[:, :2]
    # translation of the image centre, as albumentations centres its affine maps
    centre = np.array([(SIZE - 1) / 2, (SIZE - 1) / 2])
    return (
        np.degrees(np.arctan2(linear[1, 0], linear[0, 0])),
        np.sqrt(abs(np.linalg.det(linear))),
        linear @ centre + forward[:, 2] - centre,
    )


@pytest.mark.parametrize("with_map", [False, True], ids=["affine alone", "affine after a remap member"])
def test_the_affine_ranges_are_respected(with_map):
    """Over many draws, the fused map's rotation, scale and shift stay in the configured ranges and fill
    them."""
    still = {"name": "OpticalDistortion", "params": {"distort_limit": [0.0, 0.0], "p": 1.0}}  # no distortion
    transform = fused(*([still] if with_map else []), AFFINE).transforms[0]
    draws = [fitted_affine(transform, seed) for seed in range(40)]
    angles, scales, shifts = (np.array([draw[i] for draw in draws]) for i in range(3))
    assert angles.min() >= -10.5 and angles.max() <= 10.5 and np.ptp(angles) > 12
    assert scales.min() >= 0.89 and scales.max() <= 1.11 and np.ptp(scales) > 0.1
    assert np.abs(shifts).max() <= 0.0625 * SIZE + 1 and np.ptp(shifts) > 0.05 * SIZE


def test_same_seed_same_augmentation():
    """The base config's block (a OneOf of the distortions, then Affine), its OneOf always drawn: each seed
    gives one augmentation, whatever ran before."""
    distortions = [MEMBERS[name] for name in ("elastic", "grid", "optical")]
    pipeline = fused({"name": "OneOf", "params": {"p": 1.0, "transforms": distortions}}, AFFINE)
    image, mask = smooth_image(), (smooth_image(2) > 128).astype(np.uint8) * 255
    firsts = [augment(pipeline, image, mask, seed) for seed in range(8)]
    for seed, first in reversed(list(enumerate(firsts))):
        second = augment(pipeline, image, mask, seed)
        assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert not np.array_equal(firsts[0][0], firsts[1][0])


@pytest.mark.parametrize(
    "member",
    [{"name": "HorizontalFlip", "params": {}}, {"name": "Affine", "params": {"rotate": [-10, 10], "fit_output": True}}],
)
def test_members_it_cannot_fuse_are_refused(member):
    with pytest.raises(ConfigError, match="FusedGeometric cannot fuse"):
        fused(member)
