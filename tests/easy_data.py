"""A learnable dataset in the challenge's exact file form (what stage 00 writes), so that stages 01 to 05 run on
it unchanged and a tiny network learns it within a few seconds of CPU training.

The images are :func:`synthetic.make_case`'s: smooth noise, and on a positive image a bright disc, which is also
its mask. Unlike the demo's phantoms (built so that they need real learning) a disc is large and high-contrast, so
a test can ask the trained pipeline to beat the all-empty baseline by a wide margin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from pneumoseg.data.dicom import DicomTags, write_jpeg_dicom
from pneumoseg.data.rle import EMPTY, encode
from pneumoseg.demo.layouts import Stage1Layout, demo_images, patient_id
from pneumoseg.io import write_text
from synthetic import make_case


def write_easy_dataset(
    folder: str | Path, n_train: int, n_test: int, size: int, positive_rate: float, seed: int
) -> None:
    """Write ``dicom-images-{train,test}/``, ``train-rle.csv`` and the held-out ``test_labels.csv`` into
    ``folder`` in the stage-1 layout, every image its own patient.

    Args:
        folder: ``paths.input_dir`` of the experiment.
        n_train: labelled images.
        n_test: held-out test images (their labels go to ``test_labels.csv``).
        size: side of the DICOMs in pixels.
        positive_rate: share of images with a disc, in each split (rounded).
        seed: seeds the images and their UIDs.
    """
    folder = Path(folder)
    layout = Stage1Layout()
    demo = OmegaConf.create({"seed": seed, "n_train": n_train, "n_test": n_test, "follow_up_rate": 0.0})
    rng = np.random.default_rng(seed)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for image in demo_images(demo, layout):
        # Positives spread evenly over the split, so every fold and the test set get their share.
        positive = int((image.index + 1) * positive_rate) > int(image.index * positive_rate)
        pixels, mask = make_case(rng, size, positive)
        tags = DicomTags(
            sop_instance_uid=image.sop_uid,
            study_instance_uid=image.study_uid,
            series_instance_uid=image.series_uid,
            patient_id=patient_id(seed, image),
        )
        write_jpeg_dicom(folder / image.path, pixels, tags)
        rows[image.split].append((image.image_id, encode(mask > 0) if positive else EMPTY))
    test_ids = [image_id for image_id, _ in rows["test"]]
    for name, text in layout.tables(rows["train"], rows["test"], test_ids).items():
        write_text(folder / name, text)
