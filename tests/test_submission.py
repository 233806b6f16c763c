import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pneumoseg import layout
from pneumoseg.data.labels import read_labels
from pneumoseg.data.rle import encode
from pneumoseg.errors import DataError
from pneumoseg.evaluation.metrics import competition_dice
from pneumoseg.evaluation.submission import (
    check_submission,
    dice_by_image,
    read_submission,
    score_submission,
    validate_submission,
    write_submission,
)
from pneumoseg.io import write_csv
from synthetic import write_prepared

ROOT = Path(__file__).resolve().parents[1]
IDS = ["1.2.3.a", "1.2.3.b", "1.2.3.c"]
SIZES = {"1.2.3.a": (4, 4), "1.2.3.b": (4, 4), "1.2.3.c": (6, 5)}
HEADER = "ImageId,EncodedPixels\n"


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_write_submission_round_trip(tmp_path):
    path = tmp_path / "out" / "submission.csv"
    write_submission(path, IDS, ["5 2 1 1 6 1", "-1", "0 30"], sizes=SIZES)
    assert path.read_text() == HEADER + "1.2.3.a,5 2 1 1 6 1\n1.2.3.b,-1\n1.2.3.c,0 30\n"
    assert validate_submission(path, IDS, SIZES) == []
    assert [row.line for row in read_submission(path)[0]] == [2, 3, 4]
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temporary file left behind


def test_write_submission_absolute_form(tmp_path):
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1] = mask[0, 2] = mask[3, 3] = True
    path = tmp_path / "submission.csv"
    write_submission(path, ["x"], [encode(mask, "absolute")], sizes={"x": (4, 4)}, fmt="absolute")
    assert path.read_text() == HEADER + "x,6 2 9 1 16 1\n"
    # The same string read as the relative form runs past the 16 pixels of the image.
    assert validate_submission(path, ["x"], {"x": (4, 4)}, fmt="absolute") == []
    assert validate_submission(path, ["x"], {"x": (4, 4)}) != []


@pytest.mark.parametrize(
    "ids, encoded, expected, problem",
    [
        (IDS, ["5 2", "-1", "2 29"], None, "line 4, ImageId 1.2.3.c: runs reach pixel 31, beyond the 6x5 image"),
        (IDS, ["5 2", "-1 ", "3"], None, "line 4, ImageId 1.2.3.c: run-length string has an odd number of values"),
        (IDS, ["5 2", "", "-1"], None, "line 3, ImageId 1.2.3.b: EncodedPixels is empty; write -1"),
        (IDS, ["5 2", "-1", "a 2"], None, "line 4, ImageId 1.2.3.c: run-length string has a token that is not"),
        (IDS[:2] + ["1.2.3.a"], ["-1"] * 3, IDS, "line 4: ImageId 1.2.3.a again (first on line 2)"),
        (IDS, ["-1"] * 3, IDS[:2], "line 4: ImageId 1.2.3.c is not a test image"),
        (IDS[:2], ["-1"] * 2, IDS, "ImageId 1.2.3.c (test image 3 of 3) has no row"),
        (IDS[::-1], ["-1"] * 3, IDS, "line 2: ImageId 1.2.3.c where the expected order has 1.2.3.a"),
    ],
)
def test_write_submission_refuses_a_file_that_does_not_validate(tmp_path, ids, encoded, expected, problem):
    path = _write(tmp_path / "submission.csv", "an older file\n")
    with pytest.raises(DataError, match="does not validate") as info:
        write_submission(path, ids, encoded, expected_ids=expected, sizes=SIZES)
    assert problem in str(info.value)
    assert path.read_text() == "an older file\n"
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(
    "text, problem",
    [
        (
            "ImageId, EncodedPixels\n1.2.3.a,-1\n1.2.3.b,-1\n1.2.3.c,-1\n",
            "line 1: the header is 'ImageId, EncodedPixels'",
        ),
        (HEADER + "1.2.3.a,-1\n1.2.3.b,-1,3\n1.2.3.c,-1\n", "line 3: 3 fields"),
        (HEADER + "1.2.3.a,-1\n1.2.3.b,-1\n1.2.3.c,1 0\n", "line 4, ImageId 1.2.3.c: run length 0 is not positive"),
        (HEADER + "1.2.3.a,-1\n1.2.3.b,-1\n,-1\n", "line 4: no ImageId"),
        ("", "the file is empty"),
    ],
)
def test_validate_reports_each_problem_with_its_line(tmp_path, text, problem):
    path = _write(tmp_path / "submission.csv", text)
    problems = validate_submission(path, IDS, SIZES)
    assert any(problem in p for p in problems), problems


def test_validate_against_a_sample_submission_file_with_the_challenge_quirks(tmp_path):
    # A BOM, CRLF line ends and the stage-1 header with a space: the sample is read as the label files are.
    sample = tmp_path / "sample.csv"
    sample.write_bytes(("\ufeffImageId, EncodedPixels\r\n" + "".join(f"{i}, -1\r\n" for i in IDS)).encode())
    good = _write(tmp_path / "good.csv", HEADER + "".join(f"{i},-1\n" for i in IDS))
    assert validate_submission(good, sample, SIZES) == []
    assert validate_submission(tmp_path / "absent.csv", sample) == [f"{tmp_path / 'absent.csv'}: file not found"]
    with pytest.raises(DataError, match="sample submission .* not found"):
        validate_submission(good, tmp_path / "no_sample.csv")


def test_images_of_unknown_size_are_checked_as_1024_px(tmp_path):
    path = _write(tmp_path / "submission.csv", HEADER + f"x,{1024 * 1024 - 10} 10\ny,{1024 * 1024 - 10} 11\n")
    problems = validate_submission(path, ["x", "y"])
    assert len(problems) == 1 and problems[0].startswith("line 3, ImageId y: runs reach pixel 1048577")


def _masks(seed=0, n=6, shape=(20, 16)):
    rng = np.random.default_rng(seed)
    masks = rng.random((n, *shape)) > 0.7
    masks[::3] = False
    return masks


def test_score_is_the_challenge_dice_with_multi_row_labels_unioned(tmp_path):
    truth, pred = _masks(0), _masks(1)
    pred[3, :2] = True  # predicted on an empty image: Dice 0 (image 0: both empty, Dice 1)
    ids = [f"img{k}" for k in range(len(truth))]
    sizes = {i: truth.shape[1:] for i in ids}
    # Labels: each positive image split into two overlapping instances, its rows not adjacent, stage-1 form.
    rows = []
    for i, mask in zip(ids, truth):
        if not mask.any():
            rows.append((i, "-1"))
            continue
        top, bottom = mask.copy(), mask.copy()
        top[12:], bottom[:8] = False, False
        rows += [(i, encode(top)), (i, encode(bottom))]
    rows = rows[::2] + rows[1::2]
    labels = _write(tmp_path / "labels.csv", "ImageId, EncodedPixels\n" + "".join(f"{i}, {r}\n" for i, r in rows))
    submission = tmp_path / "submission.csv"
    write_submission(submission, ids[::-1], [encode(m) for m in pred[::-1]], sizes=sizes)

    per_image = dice_by_image(submission, labels, sizes)
    assert list(per_image.index) == list(read_labels(labels))
    expected = competition_dice(pred, truth)
    assert score_submission(submission, labels, sizes) == pytest.approx(expected, abs=1e-12)
    assert per_image["img0"] == 1.0 and per_image["img3"] == 0.0

    perfect = tmp_path / "perfect.csv"
    write_submission(perfect, ids, [encode(m) for m in truth], sizes=sizes)
    assert score_submission(perfect, labels, sizes) == 1.0


def test_score_refuses_a_submission_for_other_images(tmp_path):
    labels = _write(tmp_path / "labels.csv", HEADER + "a,-1\nb,-1\n")
    submission = _write(tmp_path / "submission.csv", HEADER + "a,-1\nc,-1\n")
    with pytest.raises(DataError, match="no row for 1 of the 2 images"):
        score_submission(submission, labels)
    broken = _write(tmp_path / "broken.csv", HEADER + "a,-1\nb,1 2 3\n")
    with pytest.raises(DataError, match="line 3, ImageId b"):
        score_submission(broken, labels)


@pytest.mark.real_data
def test_real_labels_merged_per_image_validate_and_score_1(tmp_path, siim_dir):
    # The first 300 images of stage_2_train.csv, every instance row kept, against one merged row per image.
    rows = pd.read_csv(siim_dir / "stage_2_train.csv", dtype=str)
    ids = list(dict.fromkeys(rows["ImageId"]))[:300]
    subset = rows[rows["ImageId"].isin(ids)]
    labels = tmp_path / "labels.csv"
    subset.to_csv(labels, index=False)
    merged = read_labels(labels)
    submission = tmp_path / "submission.csv"
    write_submission(submission, ids, [encode(merged[i].mask(1024, 1024)) for i in ids])
    assert validate_submission(submission, ids) == []
    assert score_submission(submission, labels) == 1.0
    empty = tmp_path / "empty.csv"
    write_submission(empty, ids, ["-1"] * len(ids))
    assert score_submission(empty, labels) == pytest.approx(np.mean([not merged[i].has_mask for i in ids]))


def test_check_submission_against_a_sample(tmp_path):
    sample = _write(tmp_path / "sample.csv", HEADER + "".join(f"{i},-1\n" for i in IDS))
    good = _write(tmp_path / "good.csv", HEADER + "".join(f"{i},-1\n" for i in IDS))
    bad = _write(tmp_path / "bad.csv", HEADER + "1.2.3.a,-1\n1.2.3.a,-1\n1.2.3.b,0 2000000\n")
    assert check_submission(good, sample) == (True, f"{good}: valid (relative run-length form)")
    valid, text = check_submission(bad, sample)
    assert not valid and "3 problem(s)" in text
    assert "line 3: ImageId 1.2.3.a again" in text and "1.2.3.c (test image 3 of 3) has no row" in text
    assert "line 4, ImageId 1.2.3.b: value 2000000 is beyond the 1024x1024 image" in text
    with pytest.raises(DataError, match="missing.csv not found"):
        check_submission(good, tmp_path / "missing.csv")


def test_check_submission_against_an_experiments_test_set(tiny_cfg):
    cfg = tiny_cfg("predict.fmt=absolute")
    write_prepared(cfg.paths.prepared_dir, n_images=4, sizes=(32,), n_test=2)
    test = pd.read_csv(layout.test_images_path(cfg), dtype={"ImageId": str})
    test[["rows", "cols"]] = (6, 5)  # the original sizes decide what a run may reach
    write_csv(layout.test_images_path(cfg), test)
    ids = test["ImageId"].tolist()
    submission = layout.submission_path(cfg)
    write_submission(submission, ids, ["1 30", "-1"], sizes=dict.fromkeys(ids, (6, 5)), fmt="absolute")
    assert check_submission(submission, cfg=cfg) == (True, f"{submission}: valid (absolute run-length form)")
    valid, text = check_submission(submission, cfg=cfg, fmt="relative")  # --fmt wins over predict.fmt
    assert not valid and "read as the relative run-length form" in text
    test[["rows", "cols"]] = (4, 4)
    write_csv(layout.test_images_path(cfg), test)
    assert "beyond the 4x4 image" in check_submission(submission, cfg=cfg)[1]


def test_validate_submission_script_exit_codes(tmp_path):
    sample = _write(tmp_path / "sample.csv", HEADER + "".join(f"{i},-1\n" for i in IDS))
    bad = _write(tmp_path / "bad.csv", HEADER + "1.2.3.a,-1\n")
    script = [sys.executable, str(ROOT / "scripts" / "validate_submission.py")]
    good = subprocess.run([*script, str(sample), "--sample", str(sample)], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0 and "valid" in good.stdout, good.stderr
    wrong = subprocess.run([*script, str(bad), "--sample", str(sample)], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 1 and "1 problem(s)" in wrong.stdout and "2 test images of 3 have no row" in wrong.stdout
    missing = subprocess.run(
        [*script, str(bad), "--sample", str(tmp_path / "none.csv")], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 1 and "none.csv not found" in missing.stderr


def test_repeated_problems_are_grouped_with_the_first_five(tmp_path):
    ids = [f"1.2.{k}" for k in range(120)]
    path = _write(
        tmp_path / "submission.csv",
        HEADER + "".join(f"{i},-1\n" for i in ids[:10]) + "".join(f"{i},3\n" for i in ids[10:17]) + "x,-1,1\ny,-1,2\n",
    )
    problems = validate_submission(path, ids)
    assert problems == [
        "2 lines do not have the two fields ImageId,EncodedPixels; the first 2: line 19, line 20",
        "103 test images of 120 have no row (write one per test image, -1 when empty); the first 5: "
        "1.2.17, 1.2.18, 1.2.19, 1.2.20, 1.2.21, ... and 98 more",
        "7 rows have EncodedPixels that are not valid relative run-length strings (or -1); the first 5: line 12, "
        "line 13, line 14, line 15, line 16, ... and 2 more",
    ]


@pytest.mark.parametrize("delimiter, name", [(";", "semicolons"), ("\t", "tabs")])
def test_a_wrong_delimiter_is_named_once(tmp_path, delimiter, name):
    path = _write(
        tmp_path / "submission.csv",
        f"ImageId{delimiter}EncodedPixels\n" + "".join(f"{i}{delimiter}-1\n" for i in IDS * 70),
    )
    problems = validate_submission(path, IDS, SIZES)
    assert len(problems) == 1 and f"separated by {name}" in problems[0] and "not commas" in problems[0]


def test_no_python_repr_in_a_line_with_extra_fields(tmp_path):
    path = _write(tmp_path / "submission.csv", HEADER + "1.2.3.a,-1\n1.2.3.b,-1,3\n1.2.3.c,-1\n")
    assert validate_submission(path, IDS, SIZES)[0] == "line 3: 3 fields (1.2.3.b,-1,3); expected ImageId,EncodedPixels"
