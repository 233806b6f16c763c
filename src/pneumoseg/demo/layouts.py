"""The demo's file layouts: where each release of the challenge put its DICOMs, how it named them and its label
tables, and the identifiers (UIDs, ImageIds, PatientIDs) the demo gives every image. Stage 00 writes these files;
stage 05 finds the held-out labels through :data:`TEST_LABELS`."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from pneumoseg.data.dicom import UID_ROOT
from pneumoseg.data.rle import EMPTY
from pneumoseg.registry import Registry

SPLITS = ("train", "test")  # split codes 0 and 1 in the random streams
TEST_LABELS = "test_labels.csv"
# The challenge's UIDs are <root>.1.<kind>.8323329.<counter>.<timestamp>.<random>, kind 4 for the SOP instance,
# 2 for the study and 3 for the series, whose random parts are the instance's minus 1 and minus 2.
_SOP, _STUDY, _SERIES = "1.4", "1.2", "1.3"
_UID_COUNTER_START = 1000
_UID_TIMESTAMP = 1517875165


@dataclass(frozen=True)
class DemoImage:
    """One image of the demo set: where it goes and what it is called.

    Attributes:
        split: ``"train"`` or ``"test"``.
        index: its number within the split.
        image_id: the ImageId of the label tables (the DICOM file's stem).
        path: the DICOM file, relative to the input folder.
        sop_uid, study_uid, series_uid: the DICOM's identifiers.
        patient: the index (within the split) of the patient's first image; ``index`` itself for a first visit.
        visit: 0 for a patient's first image, 1 and 2 for follow-ups.
    """

    split: str
    index: int
    image_id: str
    path: str
    sop_uid: str
    study_uid: str
    series_uid: str
    patient: int
    visit: int


def _digest(*parts: object) -> int:
    """A stable 64-bit number from the parts (Python's ``hash`` changes between runs)."""
    text = "/".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _uids(seed: int, split: int, index: int) -> tuple[str, str, str]:
    """SOP instance, study and series UIDs in the challenge's scheme, unique within a demo set."""
    counter = _UID_COUNTER_START + 2 * index + split
    stamp = _UID_TIMESTAMP + counter // 180
    random_part = 100002 + _digest(seed, split, index) % 899_990
    sop, study, series = (
        f"{UID_ROOT}.{kind}.8323329.{counter}.{stamp}.{random_part - k}"
        for k, kind in enumerate((_SOP, _STUDY, _SERIES))
    )
    return sop, study, series


class Layout:
    """Where a release of the challenge put the images, and the label tables it came with.

    Attributes:
        train_labels: the training label table's file name.
        sample_submission: the sample submission's file name, None when the release had none.
        separator: what follows each comma of the label tables.
    """

    train_labels: str
    sample_submission: str | None = None
    separator: str = ","

    def image_id(self, seed: int, split: int, index: int, sop_uid: str) -> str:
        raise NotImplementedError

    def image_path(self, split: int, image_id: str, study_uid: str, series_uid: str) -> str:
        raise NotImplementedError

    def table_names(self) -> list[str]:
        return [self.train_labels, TEST_LABELS] + ([self.sample_submission] if self.sample_submission else [])

    def tables(
        self, train_rows: Sequence[tuple[str, str]], test_rows: Sequence[tuple[str, str]], test_ids: Sequence[str]
    ) -> dict[str, str]:
        """The text of every table, by file name; rows are ``(ImageId, EncodedPixels)``."""
        texts = {self.train_labels: self._table(train_rows), TEST_LABELS: self._table(test_rows)}
        if self.sample_submission:
            texts[self.sample_submission] = self._table([(image_id, EMPTY) for image_id in test_ids])
        return texts

    def _table(self, rows: Sequence[tuple[str, str]]) -> str:
        return "".join(f"{image_id}{self.separator}{rle}\n" for image_id, rle in [("ImageId", "EncodedPixels"), *rows])


LAYOUTS: Registry[Layout] = Registry("demo layout")


@LAYOUTS.register("stage1")
class Stage1Layout(Layout):
    """The first release: images nested by study and series, named by SOP instance UID; the label table
    has a space after every comma, the header's too."""

    train_labels = "train-rle.csv"
    separator = ", "

    def image_id(self, seed: int, split: int, index: int, sop_uid: str) -> str:
        return sop_uid

    def image_path(self, split: int, image_id: str, study_uid: str, series_uid: str) -> str:
        return f"dicom-images-{SPLITS[split]}/{study_uid}/{series_uid}/{image_id}.dcm"


@LAYOUTS.register("stage2")
class Stage2Layout(Layout):
    """The second release: one flat folder of ``ID_<9 hex>.dcm`` files, plain CSVs, a sample submission."""

    train_labels = "stage_2_train.csv"
    sample_submission = "stage_2_sample_submission.csv"

    def image_id(self, seed: int, split: int, index: int, sop_uid: str) -> str:
        # An odd multiplier makes k -> 9 hex digits a bijection, so the ids of one set never clash.
        return f"ID_{(0x9E3779B97 * (2 * index + split) + _digest(seed)) % 16**9:09x}"

    def image_path(self, split: int, image_id: str, study_uid: str, series_uid: str) -> str:
        return f"stage_2_images/{image_id}.dcm"


def patient_visits(seed: int, split: int, n_images: int, follow_up_rate: float) -> list[tuple[int, int]]:
    """``(patient, visit)`` of each image of a split: about ``follow_up_rate`` of the patients have two or three
    images (follow-ups), scattered over the split as in a real archive, the others one.

    A patient is named by the index of its first image, so with ``follow_up_rate`` 0 every image is its own
    patient. The result depends on the arguments alone.
    """
    rng = np.random.default_rng(_digest(seed, split, "patients"))
    order = rng.permutation(n_images)
    visits = [(0, 0)] * n_images
    start = 0
    while start < n_images:
        size = int(rng.integers(2, 4)) if rng.random() < follow_up_rate else 1
        members = sorted(order[start : start + size].tolist())
        for visit, index in enumerate(members):
            visits[index] = (members[0], visit)
        start += size
    return visits


def demo_images(demo: DictConfig, layout: Layout) -> list[DemoImage]:
    """Every image of the demo set described by the ``demo`` config section, train images first."""
    images = []
    seed = int(demo.seed)
    for split, name in enumerate(SPLITS):
        n_images = int(demo[f"n_{name}"])
        for index, (patient, visit) in enumerate(patient_visits(seed, split, n_images, float(demo.follow_up_rate))):
            sop, study, series = _uids(seed, split, index)
            image_id = layout.image_id(seed, split, index, sop)
            images.append(
                DemoImage(
                    name,
                    index,
                    image_id,
                    layout.image_path(split, image_id, study, series),
                    sop,
                    study,
                    series,
                    patient,
                    visit,
                )
            )
    return images


def patient_id(seed: int, image: DemoImage) -> str:
    """A random-looking UUID, as the challenge's anonymised PatientIDs are; the same for every image of one
    patient."""
    digest = hashlib.blake2b(f"{seed}/{image.split}/{image.patient}".encode(), digest_size=16).digest()
    return str(uuid.UUID(bytes=digest, version=4))
