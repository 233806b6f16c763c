import csv

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pneumoseg.data import rle
from pneumoseg.errors import DataError


def _mask(height, width, pixels):
    mask = np.zeros((height, width), dtype=bool)
    for row, col in pixels:
        mask[row, col] = True
    return mask


def test_readme_example():
    mask = _mask(4, 4, [(1, 1), (2, 1), (0, 2), (3, 3)])
    assert rle.encode(mask) == "5 2 1 1 6 1"
    assert rle.encode(mask, "absolute") == "6 2 9 1 16 1"
    assert (rle.decode("5 2 1 1 6 1", 4, 4) == mask).all()
    assert (rle.decode("6 2 9 1 16 1", 4, 4, "absolute") == mask).all()


# (height, width, foreground pixels as (row, col), relative form, absolute form)
HAND_CASES = [
    pytest.param(3, 3, [], "-1", "-1", id="empty"),
    pytest.param(3, 3, [(0, 0)], "0 1", "1 1", id="first-pixel"),
    pytest.param(3, 3, [(2, 2)], "8 1", "9 1", id="last-pixel"),
    pytest.param(3, 3, [(0, 0), (1, 2), (2, 2)], "0 1 6 2", "1 1 8 2", id="first-and-run-ending-on-last"),
    pytest.param(2, 2, [(0, 0), (1, 0), (0, 1), (1, 1)], "0 4", "1 4", id="full"),
    pytest.param(3, 3, [(2, 0), (0, 1)], "2 2", "3 2", id="run-crosses-column"),
    pytest.param(3, 3, [(0, 1), (0, 2)], "3 1 2 1", "4 1 7 1", id="same-row-two-columns"),
    pytest.param(2, 3, [(1, 2)], "5 1", "6 1", id="wide-last-pixel"),
    pytest.param(3, 2, [(1, 0), (2, 1)], "1 1 3 1", "2 1 6 1", id="tall"),
    pytest.param(1, 5, [(0, 0), (0, 1), (0, 3), (0, 4)], "0 2 1 2", "1 2 4 2", id="one-row"),
]


@pytest.mark.parametrize("height, width, pixels, relative, absolute", HAND_CASES)
def test_hand_cases(height, width, pixels, relative, absolute):
    mask = _mask(height, width, pixels)
    assert rle.encode(mask) == relative
    assert rle.encode(mask, "absolute") == absolute
    assert (rle.decode(relative, height, width) == mask).all()
    assert (rle.decode(absolute, height, width, "absolute") == mask).all()


@pytest.mark.parametrize("height, width, pixels, relative, absolute", HAND_CASES)
def test_relative_and_absolute_parse_to_the_same_runs(height, width, pixels, relative, absolute):
    starts_rel, lengths_rel = rle.parse(relative, height, width)
    starts_abs, lengths_abs = rle.parse(absolute, height, width, "absolute")
    assert starts_rel.tolist() == starts_abs.tolist()
    assert lengths_rel.tolist() == lengths_abs.tolist()
    starts, lengths = rle.runs(_mask(height, width, pixels))
    assert starts.tolist() == starts_rel.tolist() and lengths.tolist() == lengths_rel.tolist()


def test_any_nonzero_dtype_is_foreground_and_spaces_are_ignored():
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[1:3, 1] = 255
    assert rle.encode(mask) == "5 2"
    assert rle.encode(mask.astype(np.float32) / 255) == "5 2"
    assert (rle.decode("  5 2 ", 4, 4) == mask.astype(bool)).all()
    assert not rle.decode(" -1", 4, 4).any()
    assert not rle.decode("", 4, 4).any()


@pytest.mark.parametrize(
    "text, fmt, message",
    [
        ("1 2 3", "relative", "odd number"),
        ("a b", "relative", "not an integer"),
        ("1.5 2", "relative", "not an integer"),
        ("5,2", "relative", "not an integer"),
        ("99999999999999999999 1", "relative", "not an integer"),
        ("-2 3", "relative", "gap -2 is negative"),
        ("0 1 -1 2", "relative", "gap -1 is negative"),
        ("3 0", "relative", "run length 0 is not positive"),
        ("3 -1", "relative", "run length -1 is not positive"),
        ("8 2", "relative", "runs reach pixel 10, beyond the 3x3 image"),
        ("5 1 3 1", "relative", "runs reach pixel 10"),
        ("12 1", "relative", "value 12 is beyond the 3x3 image"),
        # Large enough that the sums would wrap around in int64 and land inside the image.
        ("9223372036854775807 1", "relative", "beyond the 3x3 image"),
        ("4611686018427387904 1 4611686018427387904 1", "relative", "beyond the 3x3 image"),
        ("0 1", "absolute", "absolute start 0 is below 1"),
        ("5 2 6 1", "absolute", "out of order or overlap"),
        ("5 1 2 1", "absolute", "out of order or overlap"),
        ("9 2", "absolute", "runs reach pixel 10"),
    ],
)
def test_malformed_strings_are_rle_errors(text, fmt, message):
    with pytest.raises(rle.RLEError, match=message) as info:
        rle.decode(text, 3, 3, fmt)
    assert isinstance(info.value, DataError)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="fmt must be one of"):
        rle.encode(np.zeros((2, 2)), "kaggle")
    with pytest.raises(ValueError, match="fmt must be one of"):
        rle.decode("-1", 2, 2, "kaggle")
    with pytest.raises(ValueError, match="must be 2-D"):
        rle.encode(np.zeros((2, 2, 1)))


@pytest.mark.real_data
def test_every_real_row_decodes_and_reencodes_identically(siim_dir):
    with open(siim_dir / "stage_2_train.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12954
    positive = 0
    for row in rows:
        text = row["EncodedPixels"]
        mask = rle.decode(text, 1024, 1024)
        assert rle.encode(mask) == text, row["ImageId"]
        positive += text != rle.EMPTY
    assert positive == 3576


masks = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(
    lambda shape: arrays(np.bool_, shape, elements=st.booleans())
)


@settings(max_examples=200, deadline=None)
@given(mask=masks, fmt=st.sampled_from(rle.FORMATS))
def test_round_trip_random_masks(mask, fmt):
    text = rle.encode(mask, fmt)
    decoded = rle.decode(text, *mask.shape, fmt)
    assert decoded.dtype == bool and decoded.shape == mask.shape
    assert (decoded == mask).all()
    assert rle.encode(decoded, fmt) == text


@settings(max_examples=100, deadline=None)
@given(height=st.integers(1, 300), width=st.integers(1, 300), data=st.data())
def test_round_trip_sparse_runs_on_larger_images(height, width, data):
    # Random runs over the flat column-major index, including ones touching the first and last pixel.
    total = height * width
    cuts = sorted(data.draw(st.sets(st.integers(0, total), max_size=12)))
    flat = np.zeros(total, dtype=bool)
    for start, end in zip(cuts[0::2], cuts[1::2]):
        flat[start:end] = True
    mask = flat.reshape(width, height).T
    for fmt in rle.FORMATS:
        assert (rle.decode(rle.encode(mask, fmt), height, width, fmt) == mask).all()


def _reference_runs(mask):
    """Runs from the column-major flattening, the slow obvious way."""
    flat = np.flatnonzero(np.asarray(mask).T.ravel() != 0)
    if flat.size == 0:
        return [], []
    breaks = np.flatnonzero(np.diff(flat) != 1) + 1
    groups = np.split(flat, breaks)
    return [int(g[0]) for g in groups], [len(g) for g in groups]


@settings(max_examples=150, deadline=None)
@given(mask=masks, dtype=st.sampled_from([np.bool_, np.uint8, np.float32]), flip=st.booleans())
def test_runs_match_the_column_major_definition(mask, dtype, flip):
    # Strided views (a reversed, transposed mask) and non-bool dtypes take the same path as plain masks.
    view = mask.astype(dtype)[::-1].T if flip else mask.astype(dtype)
    starts, lengths = rle.runs(view)
    assert (starts.tolist(), lengths.tolist()) == _reference_runs(view)
