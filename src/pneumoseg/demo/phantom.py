"""Synthetic chest radiographs with pneumothorax masks: the pixels and labels of the built-in demo dataset.

A phantom is made in two steps from two independent random streams (see :func:`case_streams`), so the labels
of an image can be recomputed without rendering its pixels:

* :func:`make_phantom` samples the geometry: patient, pose, anatomy and the pneumothorax instances (boolean
  masks at full size).
* :func:`render` turns the geometry into an 8-bit radiograph (MONOCHROME2: air is dark, bone is bright).

The image is a density map: a body outline with arms, two lung fields with vessel-like markings, mediastinum,
spine and heart, domed diaphragms over a brighter abdomen with a gastric bubble, clavicles and ribs, breast
shadows, a side marker and on portable films ECG electrodes with their leads, a heel gradient, noise, and
per-image exposure (contrast, offset, gamma) and pose (shift, scale, rotation). Smooth structures are drawn at a
quarter of the size and upsampled; markings, lesions, overlays and noise are added at full size.

A pneumothorax is a crescent of a lung along its apex or lateral wall, where the lung has pulled away from the
chest wall: inside it the markings are missing and the density is only slightly lower than in the lung next to
it, its inner edge is a thin bright pleural line, and ribs still cross it. Normal lung has patchy density of the
same amplitude, so no intensity threshold finds the lesion (see :func:`intensity_rule_search`), while texture
and the pleural line do, which a small CNN learns. Markings and the line are a few pixels wide at 1024 px so that
they survive downscaling to 128 px. Instance areas follow the real data's: median about 6,500 px at 1024 x 1024,
5th percentile about 1,000 px, a few above 100,000 px.

Chest drains follow the label as in the real data, where many pneumothoraces were already drained when filmed: a
share :data:`DRAIN_RATE_POSITIVE` of the positive images and :data:`DRAIN_RATE_NEGATIVE` of the others have one
(decided by :func:`plan_cases`, recorded per image by the demo as a ``drain`` column). A drain is a thin bright
tube entering through the lateral chest wall on the lesion's side, kinked once, running up towards the apex, with
a side hole (a gap in its radio-opaque wall) near its tip; a detector can learn it as a shortcut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np

from pneumoseg.data.resize import resize
from pneumoseg.evaluation.metrics import competition_dice, dice_from_counts

# Instance areas at 1024 x 1024 are log-normal with the real data's median and 5th / 95th percentiles.
REFERENCE_SIZE = 1024
AREA_MEDIAN = 6500.0
AREA_LOG_SIGMA = 1.08
AREA_MIN = 400.0
AREA_MAX_LUNG_SHARE = 0.6

# Among positive images of the real data about 16% have 2 instances and 8% 3 or more; 30% of the
# multi-instance images have overlapping instances (183 of 624).
TWO_INSTANCE_RATE = 0.16
THREE_INSTANCE_RATE = 0.08
OVERLAP_RATE = 0.3

VESSEL_LEVELS = 6  # generations of forking in each tree of lung markings

# Shares of positive and of negative images with a chest drain (many real pneumothoraces are filmed drained).
DRAIN_RATE_POSITIVE = 0.6
DRAIN_RATE_NEGATIVE = 0.05
DRAIN_WIDTH = 9 / 1024  # the tube's outer width, a fraction of the image

_SUBPIXEL = 4  # fractional bits of the coordinates handed to OpenCV's drawing functions


@dataclass(frozen=True)
class CasePlan:
    """What one image will contain; decided for a whole set at once so that its rates are exact.

    Attributes:
        n_instances: 0 for a normal image, else the number of pneumothorax instances (label rows).
        overlapping: the instances are overlapping parts of one lesion (else disjoint lesions).
        drain: the image shows a chest drain.
    """

    n_instances: int
    overlapping: bool = False
    drain: bool = False


@dataclass(frozen=True)
class Patient:
    """The acquisition facts a DICOM header carries. AP films are portable: smaller lungs, larger heart."""

    sex: str
    age: int
    view_position: str
    pixel_spacing: float


@dataclass(frozen=True)
class Anatomy:
    """Shape parameters in the patient frame: the unit square, x to the image's right, y down.

    Attributes:
        pose: 2 x 3 affine map from the patient frame to the unit square of the image.
        lungs: closed outlines (N x 2) of the image-left lung (the patient's right), then the other.
        heart: centre (x, y), semi-axes (a, b) and tilt in degrees of the cardiac shadow.
        body_half_width: half the trunk's width.
        arms: whether the arms lie beside the trunk.
        breasts: whether to draw breast shadows.
        bubble: centre and semi-axes of the gastric air bubble.
        rib_jitter: 2 x 10 x 3 offsets of each rib's start, reach and curvature.
        rib_gap: vertical distance between neighbouring ribs.
        marker: corner (0 left, 1 right) of the side marker letter.
        electrodes: centres of ECG electrodes (none on PA films).
    """

    pose: np.ndarray
    lungs: tuple[np.ndarray, np.ndarray]
    heart: tuple[tuple[float, float], tuple[float, float], float]
    body_half_width: float
    arms: bool
    breasts: bool
    bubble: tuple[tuple[float, float], tuple[float, float]]
    rib_jitter: np.ndarray
    rib_gap: float
    marker: int
    electrodes: np.ndarray


@dataclass
class Phantom:
    """The geometry of one synthetic radiograph.

    Attributes:
        size: the square image's side in pixels.
        patient: sex, age, view and pixel spacing.
        anatomy: pose and shapes.
        instances: one boolean ``size x size`` mask per pneumothorax instance; empty for a normal image.
        drain: the chest drain's path (points in the patient frame), None without one.
    """

    size: int
    patient: Patient
    anatomy: Anatomy
    instances: list[np.ndarray]
    drain: np.ndarray | None = None

    @property
    def mask(self) -> np.ndarray:
        """The union of the instances: what the challenge scores."""
        union = np.zeros((self.size, self.size), dtype=bool)
        for instance in self.instances:
            union |= instance
        return union


# ----------------------------------------------------------------------------------------------------------
# Plans and random streams


def plan_cases(n: int, positive_rate: float, rng: np.random.Generator) -> list[CasePlan]:
    """Decide which of ``n`` images are positive and how many instances each one has.

    Exactly ``round(n * positive_rate)`` images are positive. The multi-instance and overlapping shares are
    rounded up, so that even a small set holds a few of each kind once it has 3 or more positives. Drains: the
    rounded shares :data:`DRAIN_RATE_POSITIVE` of the positive and :data:`DRAIN_RATE_NEGATIVE` of the negative
    images, spread over every kind of positive.
    """
    if not 0.0 <= positive_rate <= 1.0:
        raise ValueError(f"positive_rate must lie in [0, 1], got {positive_rate}")
    n_pos = int(round(n * positive_rate))
    n_multi = int(np.ceil(n_pos * (TWO_INSTANCE_RATE + THREE_INSTANCE_RATE))) if n_pos >= 3 else 0
    n_three = int(np.ceil(n_pos * THREE_INSTANCE_RATE)) if n_pos >= 3 else 0
    n_overlap = int(np.ceil(n_multi * OVERLAP_RATE))
    plans = (
        [CasePlan(3, k < n_overlap) for k in range(n_three)]
        + [CasePlan(2, k + n_three < n_overlap) for k in range(n_multi - n_three)]
        + [CasePlan(1)] * (n_pos - n_multi)
        + [CasePlan(0)] * (n - n_pos)
    )
    # Every k-th positive (and negative) gets a drain, so that the drains spread over the kinds of positives.
    for members, rate in ((range(n_pos), DRAIN_RATE_POSITIVE), (range(n_pos, n), DRAIN_RATE_NEGATIVE)):
        chosen = np.linspace(0, len(members), int(round(len(members) * rate)), endpoint=False).astype(int)
        for k in chosen:
            plans[members[k]] = replace(plans[members[k]], drain=True)
    return [plans[i] for i in rng.permutation(n)]


def split_stream(seed: int, split: int) -> np.random.Generator:
    """The random stream of a whole split (0 train, 1 test): its :func:`plan_cases`, then anything else drawn
    once per split (the order of label rows, say)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split,)))


def case_streams(seed: int, split: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """The geometry and the rendering random streams of image ``index`` of ``split`` (0 train, 1 test).

    They depend on these three numbers alone, so images can be made in any order and in parallel with the
    same result, and changing the number of images leaves the other images as they were.
    """
    geometry, pixels = np.random.SeedSequence(seed, spawn_key=(split, index)).spawn(2)
    return np.random.default_rng(geometry), np.random.default_rng(pixels)


# ----------------------------------------------------------------------------------------------------------
# Drawing helpers


def _closed_spline(points: np.ndarray, per_segment: int = 10) -> np.ndarray:
    """A smooth closed curve through ``points`` (uniform Catmull-Rom), as a dense polygon."""
    p0, p1, p2, p3 = (np.roll(points, shift, axis=0) for shift in (1, 0, -1, -2))
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None, None]
    curve = 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
    return curve.transpose(1, 0, 2).reshape(-1, 2)


def _to_pixels(points: np.ndarray, pose: np.ndarray, side: int) -> np.ndarray:
    """Patient-frame points -> fixed-point pixel coordinates on a ``side x side`` raster."""
    pixels = (points @ pose[:, :2].T + pose[:, 2]) * side
    return np.round(pixels * (1 << _SUBPIXEL)).astype(np.int32)


def _fill(side: int, polygons: Sequence[np.ndarray], pose: np.ndarray) -> np.ndarray:
    """Patient-frame polygons filled with 1 on a new ``side x side`` float32 raster (anti-aliased)."""
    canvas = np.zeros((side, side), np.float32)
    cv2.fillPoly(canvas, [_to_pixels(p, pose, side) for p in polygons], 1.0, lineType=cv2.LINE_AA, shift=_SUBPIXEL)
    return canvas


def _ellipse(side: int, pose: np.ndarray, centre, axes, tilt_deg: float = 0.0) -> np.ndarray:
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    tilt = np.deg2rad(tilt_deg)
    local = np.stack([axes[0] * np.cos(theta), axes[1] * np.sin(theta)], axis=1)
    local = local @ np.array([[np.cos(tilt), np.sin(tilt)], [-np.sin(tilt), np.cos(tilt)]])
    return _fill(side, [local + np.asarray(centre)], pose)


def _polyline(canvas: np.ndarray, points: np.ndarray, pose: np.ndarray, width: float, value: float = 1.0) -> None:
    """Draw an open patient-frame polyline ``width`` (a fraction of the image) wide onto ``canvas``."""
    side = canvas.shape[0]
    cv2.polylines(
        canvas,
        [_to_pixels(points, pose, side)],
        False,
        value,
        thickness=max(1, int(round(width * side))),
        lineType=cv2.LINE_AA,
        shift=_SUBPIXEL,
    )


def _wrap(angle):
    """Angles folded into [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _smooth_noise(rng: np.random.Generator, side: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-variance noise with blobs about ``scale`` pixels across on a ``side`` raster."""
    coarse = max(4, int(round(side / scale)))
    field = resize(rng.standard_normal((coarse, coarse)).astype(np.float32), side, side, "cubic")
    field = cv2.GaussianBlur(field, (0, 0), scale / 3)
    return (field - field.mean()) / (field.std() + 1e-6)


def _frame_grid(pose: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient-frame coordinates (x, y) of every pixel centre of a ``side x side`` raster."""
    inverse = cv2.invertAffineTransform(pose)
    gy, gx = (np.mgrid[0:side, 0:side].astype(np.float32) + 0.5) / side
    return (
        inverse[0, 0] * gx + inverse[0, 1] * gy + inverse[0, 2],
        inverse[1, 0] * gx + inverse[1, 1] * gy + inverse[1, 2],
    )


# ----------------------------------------------------------------------------------------------------------
# Geometry

# Outline of the image-left lung (the patient's right) in the patient frame, clockwise from the apex; the
# other lung is its mirror image with a dome a little lower (the heart's shadow covers its medial base).
_LUNG_OUTLINE = np.array(
    [
        [0.33, 0.13],
        [0.26, 0.16],
        [0.19, 0.27],
        [0.155, 0.42],
        [0.15, 0.58],
        [0.16, 0.70],
        [0.18, 0.77],
        [0.25, 0.72],
        [0.33, 0.67],
        [0.42, 0.67],
        [0.445, 0.56],
        [0.43, 0.44],
        [0.415, 0.30],
        [0.395, 0.18],
    ]
)
_LOWER_DOME = np.array([0, 0, 0, 0, 0.01, 0.02, 0.025, 0.03, 0.03, 0.02, 0.01, 0, 0, 0])


def _sample_pose(rng: np.random.Generator) -> np.ndarray:
    angle = np.deg2rad(rng.normal(0.0, 2.0))
    scale = rng.uniform(0.86, 1.04)
    shift = rng.normal(0.0, 0.025, size=2) + [0.0, rng.uniform(-0.02, 0.05)]
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.hstack([rot, (0.5 + shift - rot @ [0.5, 0.5])[:, None]])


def _sample_lungs(rng: np.random.Generator, view: str) -> tuple[np.ndarray, np.ndarray]:
    height = rng.uniform(0.9, 1.08) * (0.94 if view == "AP" else 1.0)
    width = rng.uniform(0.93, 1.07)
    lungs = []
    for side in (0, 1):
        outline = _LUNG_OUTLINE.copy()
        if side:
            outline[:, 0] = 1 - outline[:, 0]
            outline[:, 1] += _LOWER_DOME
        outline += rng.normal(0.0, 0.008, size=outline.shape)
        outline = (outline - [0.5, 0.13]) * [width, height] + [0.5, 0.13]
        lungs.append(_closed_spline(outline))
    return lungs[0], lungs[1]


def _sample_area(rng: np.random.Generator, size: int, lung_area: int) -> float:
    """An instance area in pixels of a ``size`` image, at most a share of the lung it lies in."""
    scale = (size / REFERENCE_SIZE) ** 2
    area = np.exp(rng.normal(np.log(AREA_MEDIAN), AREA_LOG_SIGMA)) * scale
    return float(np.clip(area, AREA_MIN * scale, AREA_MAX_LUNG_SHARE * lung_area))


def _crescent(lung: np.ndarray, side: int, area: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A pneumothorax band of ``area`` pixels along the apex or the lateral wall of one lung.

    Args:
        lung: boolean mask of the lung.
        side: 0 for the image-left lung, 1 for the other (decides which way is lateral).
        area: the band's area in pixels.

    Returns:
        The band's boolean mask and, on the band, each pixel's angle about the lung's centre relative to the
        band's middle (NaN elsewhere), by which :func:`_split` cuts it into instances.
    """
    ys, xs = np.nonzero(lung)
    top, left = ys.min(), xs.min()
    box = lung[top : ys.max() + 1, left : xs.max() + 1]
    depth = cv2.distanceTransform(box.astype(np.uint8), cv2.DIST_L2, 3)  # distance below the pleura
    gy, gx = np.mgrid[0 : box.shape[0], 0 : box.shape[1]]
    cy, cx = ys.mean() - top, xs.mean() - left
    apical, lateral = -np.pi / 2, (np.pi if side == 0 else 0.0)
    middle = apical + rng.beta(1.2, 1.2) * _wrap(lateral - apical)
    angle = _wrap(np.arctan2(gy - cy, gx - cx) - middle)
    # About three times as long as thick (area ~ 0.2 length^2), the length laid along the pleura at the
    # pleura's distance from the centre in the band's direction.
    radius = np.hypot(gy - cy, gx - cx)[box & (np.abs(angle) < 0.1)].max()
    length = np.sqrt(5 * area) * rng.uniform(0.8, 1.25)
    half_width = np.clip(length / (2 * radius), 0.12, 1.8)
    offset = np.abs(angle) / half_width
    # Thickness profile along the band: blunt-ended, largest in the middle.
    profile = np.cos(np.clip(offset, 0, 1) * np.pi / 2) ** rng.uniform(0.3, 0.6)
    ratio = np.full(box.shape, np.inf)
    inside = box & (offset < 1)
    ratio[inside] = depth[inside] / np.maximum(profile[inside], 1e-6)
    # The thickness that gives the wanted area: the area-th smallest depth / profile ratio.
    n_pixels = int(np.clip(round(area), 1, inside.sum()))
    band_box = ratio <= np.partition(ratio.ravel(), n_pixels - 1)[n_pixels - 1]
    band = np.zeros_like(lung)
    band[top : top + box.shape[0], left : left + box.shape[1]] = band_box
    band_angle = np.full(lung.shape, np.nan, np.float32)
    band_angle[top : top + box.shape[0], left : left + box.shape[1]][band_box] = angle[band_box]
    return band, band_angle


def _split(band: np.ndarray, band_angle: np.ndarray, parts: int, overlap: float) -> list[np.ndarray]:
    """Cut a band into ``parts`` instances across its length.

    Args:
        overlap: share of the band's pixels that neighbouring parts have in common (> 0), or that lies
            between them in neither (< 0).
    """
    values = band_angle[band]
    cuts = np.linspace(0, 1, parts + 1)
    low = np.quantile(values, np.clip(cuts[:-1] - overlap / 2, 0, 1))
    high = np.quantile(values, np.clip(cuts[1:] + overlap / 2, 0, 1))
    low[0], high[-1] = -np.inf, np.inf
    return [band & (band_angle >= lo) & (band_angle <= hi) for lo, hi in zip(low, high)]


def _lesions(
    rng: np.random.Generator,
    size: int,
    lung_masks: Sequence[np.ndarray],
    plan: CasePlan,
) -> list[np.ndarray]:
    """The instances of a plan: one lesion cut into overlapping parts, or disjoint lesions, the second in
    the other lung and the third a piece of the first cut off by a gap."""
    if plan.n_instances == 0:
        return []
    if plan.overlapping:
        parts, overlap = [plan.n_instances], rng.uniform(0.08, 0.25)
    else:
        parts, overlap = ([1] if plan.n_instances == 1 else [plan.n_instances - 1, 1]), -rng.uniform(0.1, 0.2)
    first = int(rng.integers(2))
    instances = []
    for k, n_parts in enumerate(parts):
        side = (first + k) % 2
        area = _sample_area(rng, size, int(lung_masks[side].sum())) / len(parts) ** 0.5
        band, band_angle = _crescent(lung_masks[side], side, area, rng)
        instances += _split(band, band_angle, n_parts, overlap) if n_parts > 1 else [band]
    # A label row must never be empty; only a lesion of a pixel or two at a tiny image size could be.
    return [instance for instance in instances if instance.any()]


def sample_patient(rng: np.random.Generator) -> Patient:
    """The patient of an image: the first draws of its geometry stream (see :func:`case_streams`)."""
    view = "AP" if rng.random() < 0.4 else "PA"
    return Patient(
        sex="F" if rng.random() < 0.45 else "M",
        age=int(np.clip(rng.normal(48, 17), 2, 92)),
        view_position=view,
        pixel_spacing=float(rng.choice([0.139, 0.143, 0.168, 0.171, 0.194])),
    )


def make_phantom(rng: np.random.Generator, size: int, plan: CasePlan, same_as: Patient | None = None) -> Phantom:
    """Sample the geometry of one radiograph: patient, pose, anatomy and pneumothorax instances.

    Args:
        rng: the image's geometry stream (see :func:`case_streams`).
        size: the image's side in pixels (the challenge's is 1024).
        plan: how many instances, and whether they overlap.
        same_as: for a follow-up image, the patient whose sex and age it takes (view and spacing are its own).
    """
    patient = sample_patient(rng)
    if same_as is not None:
        # Drawn anyway, so a follow-up's pose and anatomy come from the same stream positions as before.
        patient = replace(patient, sex=same_as.sex, age=same_as.age)
    view = patient.view_position
    pose = _sample_pose(rng)
    lungs = _sample_lungs(rng, view)
    anatomy = Anatomy(
        pose=pose,
        lungs=lungs,
        heart=(
            tuple(rng.normal([0.545, 0.665], 0.01)),
            (rng.uniform(0.15, 0.17) * (1.1 if view == "AP" else 1.0), rng.uniform(0.11, 0.13)),
            rng.uniform(-22, -8),
        ),
        body_half_width=rng.uniform(0.41, 0.5),
        arms=bool(rng.random() < 0.6),
        breasts=bool(patient.sex == "F" and rng.random() < 0.7),
        bubble=(tuple(rng.normal([0.64, 0.77], 0.015)), (rng.uniform(0.03, 0.06), rng.uniform(0.015, 0.03))),
        rib_jitter=rng.normal(0.0, 0.006, size=(2, 10, 3)),
        rib_gap=rng.uniform(0.062, 0.072),
        marker=int(rng.integers(2)),
        electrodes=(
            rng.uniform([0.15, 0.1], [0.85, 0.9], size=(int(rng.integers(2, 5)), 2))
            if view == "AP" and rng.random() < 0.5
            else np.empty((0, 2))
        ),
    )
    lung_masks = [_fill(size, [lung], pose) > 0.5 for lung in lungs]
    instances = _lesions(rng, size, lung_masks, plan)
    # Drawn last, so an image without a drain keeps every other draw of its stream.
    drain = _sample_drain(rng, _lesion_side(instances, size, rng)) if plan.drain else None
    return Phantom(size, patient, anatomy, instances, drain)


def _lesion_side(instances: Sequence[np.ndarray], size: int, rng: np.random.Generator) -> int:
    """-1 when the (first) lesion lies in the image's left half, 1 in the right; a random side without one."""
    if not instances:
        return -1 if rng.random() < 0.5 else 1
    return -1 if np.nonzero(instances[0])[1].mean() < size / 2 else 1


def _sample_drain(rng: np.random.Generator, side: int) -> np.ndarray:
    """A drain's path in the patient frame on ``side`` (-1: the image's left): in through the lateral chest wall,
    a kink, then up along the lateral lung towards the apex."""
    corners = np.array(
        [
            [0.5 + side * rng.uniform(0.50, 0.56), rng.uniform(0.62, 0.74)],  # outside the body
            [0.5 + side * rng.uniform(0.38, 0.42), rng.uniform(0.55, 0.6)],  # through the chest wall
            [0.5 + side * rng.uniform(0.32, 0.35), rng.uniform(0.42, 0.5)],  # the kink
            [0.5 + side * rng.uniform(0.2, 0.27), rng.uniform(0.16, 0.24)],  # the tip, near the apex
        ]
    )
    t = np.linspace(0, 1, 12)[:, None]
    return np.concatenate([a + t * (b - a) for a, b in zip(corners, corners[1:])])


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _body(anatomy: Anatomy, side: int) -> np.ndarray:
    """Trunk, neck and shoulders, and the arms when they lie beside the trunk."""
    half, neck = anatomy.body_half_width, 0.085
    right = np.array(
        [
            [neck, -0.2],
            [neck, 0.06],
            [0.5 * half, 0.1],
            [0.9 * half, 0.15],
            [half, 0.24],
            [1.02 * half, 0.6],
            [1.05 * half, 1.3],
        ]
    )
    outline = np.concatenate([right * [-1, 1], right[::-1]]) + [0.5, 0]
    shapes = [_closed_spline(outline, 6)]
    if anatomy.arms:
        for sign in (-1, 1):
            arm = np.array(
                [
                    [0.9 * half, 0.13],
                    [1.12 * half, 0.13],
                    [1.32 * half, 0.5],
                    [1.4 * half, 1.2],
                    [1.2 * half, 1.2],
                    [1.06 * half, 0.5],
                ]
            )
            shapes.append(_closed_spline(arm * [sign, 1] + [0.5, 0], 6))
    return _fill(side, shapes, anatomy.pose)


def _ribs(anatomy: Anatomy, side: int) -> np.ndarray:
    """Posterior ribs (arcs from the spine outwards and down) and clavicles, with brighter cortical rims."""
    canvas = np.zeros((side, side), np.float32)
    rims = np.zeros_like(canvas)
    s = np.linspace(0, 1, 16)
    for lung_side, direction in ((0, -1), (1, 1)):
        for k, (start, reach, bend) in enumerate(anatomy.rib_jitter[lung_side]):
            x = 0.5 + direction * (0.03 + (0.36 + reach + 0.01 * k) * s)
            y = 0.12 + k * anatomy.rib_gap + start - 0.05 * np.sin(0.75 * np.pi * s) + (0.09 + bend) * s**2 + 0.02 * s
            width = 0.021 + 0.001 * k
            _polyline(canvas, np.stack([x, y], axis=1), anatomy.pose, width)
            _polyline(rims, np.stack([x, y], axis=1), anatomy.pose, width + 2.0 / side)
        clavicle = np.stack([0.5 + direction * (0.04 + 0.3 * s), 0.14 - 0.04 * s + 0.03 * s**2], axis=1)
        _polyline(canvas, clavicle, anatomy.pose, 0.026, 1.6)
    return canvas + 0.5 * np.clip(rims - canvas, 0, 1)


def _vessel_trees(
    rng: np.random.Generator, canvas: np.ndarray, pose: np.ndarray, roots: np.ndarray, headings: np.ndarray
) -> None:
    """Draw forking vessels from ``roots`` (N x 2, frame coordinates) along about ``headings`` (N angles):
    each is a slightly bent segment that splits into two thinner, shorter ones, :data:`VESSEL_LEVELS`
    generations deep; one generation is drawn at a time. The first segments' length and width are drawn
    once for all the trees of a call."""
    headings = headings + rng.normal(0, 0.1, len(roots))
    length, width = rng.uniform(0.085, 0.105), rng.uniform(0.008, 0.011)
    lengths = length * rng.uniform(0.9, 1.1, len(roots))
    for _ in range(VESSEL_LEVELS):
        bends = headings + rng.normal(0, 0.15, len(roots))
        mids = roots + 0.5 * lengths[:, None] * np.stack([np.cos(headings), np.sin(headings)], axis=1)
        tips = mids + 0.5 * lengths[:, None] * np.stack([np.cos(bends), np.sin(bends)], axis=1)
        side = canvas.shape[0]
        paths = _to_pixels(np.stack([roots, mids, tips], axis=1).reshape(-1, 2), pose, side).reshape(-1, 3, 2)
        cv2.polylines(
            canvas,
            list(paths),
            False,
            1.0,
            thickness=max(1, int(round(width * side))),
            lineType=cv2.LINE_AA,
            shift=_SUBPIXEL,
        )
        roots = np.repeat(tips, 2, axis=0)
        headings = np.repeat(bends, 2) + np.tile([-1, 1], len(bends)) * rng.uniform(0.15, 0.4, 2 * len(bends))
        lengths = np.repeat(lengths, 2) * rng.uniform(0.65, 0.85, 2 * len(lengths))
        width *= 0.8


def _markings(rng: np.random.Generator, anatomy: Anatomy, size: int) -> np.ndarray:
    """Vessel-like lung markings (not yet confined to the lungs): trees fanning out from each hilum over a
    fine mottle, so that the periphery, where a pneumothorax lies, is textured too."""
    canvas = np.zeros((size, size), np.float32)
    fan = np.linspace(-1.75, 1.65, 12)
    for hilum, headings in (((0.41, 0.45), np.pi - fan), ((0.59, 0.45), fan)):
        roots = np.asarray(hilum) + rng.normal(0, 0.015, (len(fan), 2))
        _vessel_trees(rng, canvas, anatomy.pose, roots, headings)
    blurred = cv2.GaussianBlur(canvas, (0, 0), max(0.6, size / 700))
    # Unclipped, so the mottle has no blank patches that would pass for missing markings.
    mottle = 0.5 + 0.5 * _smooth_noise(rng, size, size / 48)
    return 0.6 * blurred + 0.4 * mottle


def _pleural_line(phantom: Phantom) -> np.ndarray:
    """The visceral pleural line: the lesions' edge that faces the remaining lung, a few pixels wide at 1024."""
    size = phantom.size
    lesion = phantom.mask.astype(np.uint8)
    lung = (_fill(size, phantom.anatomy.lungs, phantom.anatomy.pose) > 0.5).astype(np.uint8)
    width = max(1, int(round(5 * size / REFERENCE_SIZE)))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    # Eroding the lung leaves out the lesion's edge along the chest wall.
    ring = np.asarray(cv2.dilate(lesion, disc), np.uint8) & (1 - lesion) & np.asarray(cv2.erode(lung, disc), np.uint8)
    return cv2.GaussianBlur(ring.astype(np.float32), (0, 0), max(0.7, size / REFERENCE_SIZE))


def _overlays(phantom: Phantom) -> np.ndarray:
    """Things outside the patient, drawn at full size: the side marker letter, ECG electrodes and leads."""
    size, anatomy = phantom.size, phantom.anatomy
    canvas = np.zeros((size, size), np.uint8)  # OpenCV draws text on 8-bit images only
    scale = size / REFERENCE_SIZE
    corner = (int(size * (0.05 if anatomy.marker == 0 else 0.9)), int(size * 0.08))
    cv2.putText(
        canvas,
        "R" if anatomy.marker == 0 else "L",
        corner,
        cv2.FONT_HERSHEY_SIMPLEX,
        1.6 * scale,
        255,
        max(1, int(round(4 * scale))),
        cv2.LINE_AA,
    )
    for x, y in anatomy.electrodes:
        centre = tuple(int(c) for c in _to_pixels(np.array([[x, y]]), anatomy.pose, size)[0] >> _SUBPIXEL)
        cv2.circle(canvas, centre, max(2, int(round(14 * scale))), 160, max(1, int(round(5 * scale))), cv2.LINE_AA)
        # The lead: a quadratic Bezier curve sagging from the electrode to the image's lower edge.
        ends = np.array([[x, y], [x - 0.15 * np.sign(x - 0.5), y + 0.25], [0.5 + 0.6 * np.sign(x - 0.5), 1.1]])
        t = np.linspace(0, 1, 24)[:, None]
        lead = (1 - t) ** 2 * ends[0] + 2 * (1 - t) * t * ends[1] + t**2 * ends[2]
        _polyline(canvas, lead, anatomy.pose, 3 / REFERENCE_SIZE, 50)
    return canvas.astype(np.float32) / 255


def _drain(phantom: Phantom) -> np.ndarray:
    """The drain's density: a bright tube wall around a fainter lumen, with a side hole near the tip."""
    canvas = np.zeros((phantom.size, phantom.size), np.float32)
    if phantom.drain is None:
        return canvas
    pose, path = phantom.anatomy.pose, phantom.drain
    _polyline(canvas, path, pose, DRAIN_WIDTH, 1.0)
    _polyline(canvas, path, pose, DRAIN_WIDTH / 2.5, 0.45)
    hole = path[-4:-2]
    _polyline(canvas, hole, pose, DRAIN_WIDTH, 0.3)
    return canvas


def render(phantom: Phantom, rng: np.random.Generator) -> np.ndarray:
    """Render a phantom as an 8-bit ``size x size`` radiograph (MONOCHROME2).

    Args:
        phantom: the geometry from :func:`make_phantom`.
        rng: the image's rendering stream (see :func:`case_streams`).
    """
    size, anatomy = phantom.size, phantom.anatomy
    pose = anatomy.pose
    low = max(64, size // 4)
    blur = low / 256
    u, v = _frame_grid(pose, low)

    body = cv2.GaussianBlur(_body(anatomy, low), (0, 0), 1.5 * blur)
    lungs = cv2.GaussianBlur(_fill(low, anatomy.lungs, pose), (0, 0), 1.2 * blur)
    heart = cv2.GaussianBlur(_ellipse(low, pose, *anatomy.heart), (0, 0), 2.5 * blur)
    spine = np.exp(-(((u - 0.5) / 0.035) ** 4)) * (1 + 0.25 * np.cos(4 * np.pi * v / anatomy.rib_gap))
    bubble = cv2.GaussianBlur(_ellipse(low, pose, *anatomy.bubble), (0, 0), 1.5 * blur)
    ribs = cv2.GaussianBlur(_ribs(anatomy, low), (0, 0), 0.6 * blur)

    # Soft tissue is thickest in the middle, so mediastinum and abdomen come out brightest; the heart's
    # shadow hides the lung behind it.
    thickness = np.sqrt(np.clip(1 - ((u - 0.5) / (1.1 * anatomy.body_half_width)) ** 2, 0, 1))
    density = body * (0.38 + 0.3 * thickness) - 0.3 * lungs
    density += body * (0.05 * spine * (1 - lungs) + heart * (0.03 + 0.3 * lungs) + 0.05 * ribs * (0.3 + 0.7 * lungs))
    density -= 0.2 * bubble * (1 - lungs)
    if anatomy.breasts:
        for cx in (0.28, 0.72):
            breast = _ellipse(low, pose, (cx, 0.8), (0.16, 0.11))
            density += rng.uniform(0.04, 0.08) * cv2.GaussianBlur(breast, (0, 0), 8 * blur)
    # Normal lung is patchy, with the amplitude of a lesion's darkening, so intensity cannot find lesions.
    density += 0.03 * lungs * _smooth_noise(rng, low, low / 6)
    heel = rng.normal(0, 1, 2)
    density += 0.04 * (heel[0] * (u - 0.5) + heel[1] * (v - 0.5))
    density = resize(density, size, size, "linear")

    visible_lung = lungs * (1 - heart)
    markings = _markings(rng, anatomy, size) * resize(visible_lung, size, size, "linear")
    if phantom.instances:
        lesion = cv2.GaussianBlur(phantom.mask.astype(np.float32), (0, 0), max(0.8, size / 600))
        markings *= 1 - lesion
        density -= rng.uniform(0.01, 0.03) * lesion
        density += rng.uniform(0.1, 0.15) * _pleural_line(phantom)
    density += rng.uniform(0.14, 0.17) * markings + _overlays(phantom)
    if phantom.drain is not None:
        density += 0.3 * _drain(phantom)
    density += rng.uniform(0.008, 0.016) * rng.standard_normal((size, size), dtype=np.float32)

    contrast, offset, gamma = rng.uniform(0.95, 1.3), rng.uniform(-0.05, 0.1), rng.uniform(0.75, 1.35)
    image = np.clip(offset + contrast * density, 0, 1) ** gamma
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# How hard the phantom is


@dataclass(frozen=True)
class RuleResult:
    """The best intensity rule found by :func:`intensity_rule_search`, with the all-empty baseline."""

    baseline: float  # challenge score of predicting every image empty
    score: float  # challenge score of the best rule
    sigma: float  # Gaussian smoothing before thresholding, in pixels (0: none)
    polarity: str  # "dark": pixel < threshold; "bright": pixel > threshold
    threshold: float  # -inf when predicting nothing beats every rule
    min_area: int  # connected components smaller than this are dropped

    @property
    def margin(self) -> float:
        return self.score - self.baseline


def apply_intensity_rule(image: np.ndarray, sigma: float, polarity: str, threshold: float, min_area: int) -> np.ndarray:
    """The boolean mask that one intensity rule (see :func:`intensity_rule_search`) predicts for an image."""
    count, labels, stats = _components(_smooth(image, sigma), polarity, threshold)
    keep = np.concatenate([[False], stats[1:, cv2.CC_STAT_AREA] >= min_area])
    return keep[labels]


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    image = image.astype(np.float32)
    return cv2.GaussianBlur(image, (0, 0), sigma) if sigma else image


def _components(image: np.ndarray, polarity: str, threshold: float):
    binary = (image < threshold) if polarity == "dark" else (image > threshold)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    return count, labels, stats


def intensity_rule_search(
    images: np.ndarray,
    masks: np.ndarray,
    sigmas: Sequence[float] = (0, 1, 2, 4),
    thresholds: Sequence[float] = tuple(range(4, 253, 4)),
    min_areas: Sequence[int] | None = None,
) -> RuleResult:
    """Tune the best pixel-intensity rule on labelled images: what a segmenter that learns nothing scores.

    The rule smooths the image, keeps the pixels darker (or brighter) than one global threshold, and drops
    connected components smaller than a minimum area. Every combination of the values given and both
    polarities is scored with the challenge metric, from per-component pixel counts; the winner is then
    rescored on its masks with :func:`pneumoseg.evaluation.metrics.competition_dice`.

    Args:
        images: N x H x W uint8 images.
        masks: N x H x W boolean ground truth.
        sigmas: smoothing widths to try, in pixels of these images.
        thresholds: intensity levels to try.
        min_areas: minimum component areas to try; by default 0 and the powers of two up to the image area.
    """
    n, height, width = masks.shape
    areas = np.asarray(
        min_areas if min_areas is not None else [0] + [2**k for k in range(int(np.log2(height * width)) + 1)]
    )
    true_area = masks.reshape(n, -1).sum(1)
    # Predicting nothing ("darker than -inf") is always available.
    best = (float(dice_from_counts(0, 0, true_area).mean()), 0.0, "dark", -np.inf, 0)
    for sigma in sigmas:
        smooth = [_smooth(image, sigma) for image in images]
        for polarity in ("dark", "bright"):
            for threshold in thresholds:
                intersection = np.zeros((n, areas.size))
                predicted = np.zeros((n, areas.size))
                for i in range(n):
                    count, labels, stats = _components(smooth[i], polarity, threshold)
                    component_area = stats[1:, cv2.CC_STAT_AREA]
                    overlap = np.bincount(labels[masks[i]], minlength=count)[1:]
                    keep = (component_area[None, :] >= areas[:, None]).astype(np.float64)
                    predicted[i], intersection[i] = keep @ component_area, keep @ overlap
                scores = dice_from_counts(intersection, predicted, true_area[:, None]).mean(0)
                k = int(np.argmax(scores))
                if scores[k] > best[0]:
                    best = (float(scores[k]), float(sigma), polarity, float(threshold), int(areas[k]))
    _, sigma, polarity, threshold, min_area = best
    prediction = np.stack([apply_intensity_rule(image, sigma, polarity, threshold, min_area) for image in images])
    return RuleResult(
        baseline=competition_dice(np.zeros_like(masks), masks),
        score=competition_dice(prediction, masks),
        sigma=sigma,
        polarity=polarity,
        threshold=threshold,
        min_area=min_area,
    )
