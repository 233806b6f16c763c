import numpy as np
import pytest

from pneumoseg.data import folds, inputs, rle
from pneumoseg.data import labels as lb
from pneumoseg.errors import ConfigError, DataError

# The README's 4x4 example, split into two instances that share pixel (2, 1).
FIRST = "5 2"  # (1, 1), (2, 1)
SECOND = "6 1 1 1"  # (2, 1), (0, 2)


def write(path, text: str, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.real_data
def test_real_label_file_counts(siim_dir):
    labels = lb.read_labels(siim_dir / "stage_2_train.csv")
    assert sum(image.n_rows for image in labels.values()) == 12954
    assert len(labels) == 12047
    assert sum(image.has_mask for image in labels.values()) == 2669
    assert sum(image.n_instances for image in labels.values()) == 3576
    several = [image for image in labels.values() if image.n_rows > 1]
    assert len(several) == 624
    overlapping = 0
    for image in several:
        instances = image.instance_masks(1024, 1024)
        overlapping += sum(int(m.sum()) for m in instances) > int(image.mask(1024, 1024).sum())
    assert overlapping == 183


@pytest.mark.real_data
def test_sample_images_file_with_bom_crlf_and_no_header(siim_dir):
    path = siim_dir / "sample_images" / "train-rle-sample.csv"
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw and not raw[3:].startswith(b"ImageId")
    labels = lb.read_labels(path)
    assert len(labels) == 10 and sum(image.has_mask for image in labels.values()) == 5
    stems = {p.stem for p in (siim_dir / "sample_images").glob("*.dcm")}
    assert set(labels) == stems  # no BOM left on the first ImageId
    first = next(iter(labels.values()))
    assert first.first_line == 1 and not first.has_mask
    for image in labels.values():
        if image.has_mask:
            assert not image.rles[0].startswith(" ")  # the leading space of positive values is stripped
            assert 0 < image.mask(1024, 1024).sum() < 1024 * 1024 // 4


def test_stage1_form_with_spaces_and_non_adjacent_rows(tmp_path):
    path = write(tmp_path / "train-rle.csv", f"ImageId, EncodedPixels\nA, {FIRST}\nB, -1\nA, {SECOND}\n\nC, -1\n")
    rows = lb.read_rle_csv(path)
    assert rows.values.tolist() == [["A", FIRST, 2], ["B", "-1", 3], ["A", SECOND, 4], ["C", "-1", 6]]
    labels = lb.read_labels(path)
    assert list(labels) == ["A", "B", "C"]
    a = labels["A"]
    assert (a.n_rows, a.n_instances, a.lines, a.first_line) == (2, 2, (2, 4), 2)
    expected = np.zeros((4, 4), bool)
    expected[[1, 2, 0], [1, 1, 2]] = True
    assert (a.mask(4, 4) == expected).all()
    assert [m.sum() for m in a.instance_masks(4, 4)] == [2, 2]
    assert not labels["B"].has_mask and not labels["B"].mask(4, 4).any()


@pytest.mark.parametrize(
    "text",
    [
        "ImageId,EncodedPixels\r\nA,5 2\r\n",  # stage 2 with CRLF
        "\ufeffA,5 2\r\n",  # BOM, CRLF, no header
        "EncodedPixels,ImageId\n5 2,A\n",  # columns in the other order
        "imageid , encodedpixels \n A , 5 2 \n",  # any case and spacing in the header
    ],
)
def test_every_form_of_the_file_reads(tmp_path, text):
    path = write(tmp_path / "labels.csv", text)
    assert lb.read_rle_csv(path)[["ImageId", "EncodedPixels"]].values.tolist() == [["A", "5 2"]]


@pytest.mark.parametrize(
    "text, message",
    [
        ("ImageId,EncodedPixels\nA\n", "line 2: expected 2 fields"),
        ("A,5 2,extra\n", "line 1: expected 2 fields"),
        ("ImageId,EncodedPixels\nA,-1\n,5 2\n", "line 3: expected 2 fields with an ImageId"),
        ("ImageId,Mask\nA,-1\n", "lacks EncodedPixels"),
        ("\n\n", "has no rows"),
        ("ImageId,EncodedPixels\n", "has no rows"),
    ],
)
def test_malformed_files_are_data_errors(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        lb.read_rle_csv(write(tmp_path / "labels.csv", text))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read label file"):
        lb.read_rle_csv(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("5 2 1", "odd number"),
        ("5 two", "not an integer"),
        ("-1 2", "gap -1 is negative"),
        ("15 2", "beyond the 4x4 image"),
    ],
)
def test_malformed_row_names_file_line_and_image(tmp_path, bad, message):
    path = write(tmp_path / "train-rle.csv", f"ImageId, EncodedPixels\nA, {FIRST}\nB, -1\nA,  {bad}\n")
    image = lb.read_labels(path)["A"]
    with pytest.raises(rle.RLEError, match=rf"train-rle.csv, line 4, ImageId A: .*{message}.*Fix or remove"):
        image.mask(4, 4)


def test_read_image_ids_keeps_first_appearance_order(tmp_path):
    path = write(tmp_path / "sub.csv", "ImageId,EncodedPixels\nB,-1\nA,-1\nB,1 1\n")
    assert lb.read_image_ids(path) == ["B", "A"]


@pytest.fixture
def input_dir(tmp_path):
    folder = tmp_path / "input"
    folder.mkdir()
    return folder


def test_auto_finds_either_label_file_and_prefers_stage2(input_dir):
    write(input_dir / "train-rle.csv", "A,-1\n")
    assert inputs.locate_train_labels("auto", input_dir) == input_dir / "train-rle.csv"
    write(input_dir / "stage_2_train.csv", "A,-1\n")
    assert inputs.locate_train_labels("auto", input_dir) == input_dir / "stage_2_train.csv"


def test_auto_looks_in_subfolders_shallowest_first(input_dir):
    (input_dir / "siim" / "deeper").mkdir(parents=True)
    write(input_dir / "siim" / "deeper" / "stage_2_train.csv", "A,-1\n")
    write(input_dir / "siim" / "train-rle.csv", "A,-1\n")
    assert inputs.locate_train_labels("auto", input_dir) == input_dir / "siim" / "train-rle.csv"


def test_explicit_paths(input_dir, tmp_path):
    write(input_dir / "mine.csv", "A,-1\n")
    write(tmp_path / "elsewhere.csv", "A,-1\n")
    assert inputs.locate_train_labels("mine.csv", input_dir) == input_dir / "mine.csv"
    assert inputs.locate_train_labels(str(tmp_path / "elsewhere.csv"), input_dir) == tmp_path / "elsewhere.csv"
    with pytest.raises(DataError, match="file not found: gone.csv"):
        inputs.locate_train_labels("gone.csv", input_dir)


def test_missing_label_file_says_what_to_put_where(input_dir, tmp_path):
    with pytest.raises(DataError, match=rf"no training label file in {input_dir}: put .*train-rle.csv"):
        inputs.locate_train_labels("auto", input_dir)
    with pytest.raises(DataError, match="which does not exist"):
        inputs.locate_train_labels("auto", tmp_path / "absent")
    with pytest.raises(DataError, match="data.train_labels is null"):
        inputs.locate_train_labels(None, input_dir)


def test_sample_submission_is_optional(input_dir):
    assert inputs.locate_sample_submission("auto", input_dir) is None
    assert inputs.locate_sample_submission(None, input_dir) is None
    write(input_dir / "sample_submission.csv", "ImageId,EncodedPixels\nA,-1\n")
    write(input_dir / "stage_2_sample_submission.csv", "ImageId,EncodedPixels\nB,-1\n")
    assert inputs.locate_sample_submission("auto", input_dir) == input_dir / "stage_2_sample_submission.csv"
    assert inputs.locate_sample_submission(None, input_dir) is None


EDGES = [0, 2000, 6500, 20000]


@pytest.mark.parametrize(
    "area, expected", [(0, 0), (1, 1), (2000, 1), (2001, 2), (6500, 2), (20000, 3), (20001, 4), (10**6, 4)]
)
def test_area_bins(area, expected):
    assert folds.area_bins([area], EDGES).tolist() == [expected]


def test_bin_names():
    assert folds.bin_names(EDGES) == ["empty", "1-2000", "2001-6500", "6501-20000", ">20000"]


@pytest.mark.parametrize("edges", [[], [1, 10], [0, 10, 10], [0, 10, 5]])
def test_bad_area_edges(edges):
    with pytest.raises(ConfigError, match="must start with 0 and increase"):
        folds.check_area_edges(edges)


@pytest.mark.parametrize(
    "bins, min_count, expected",
    [
        ([0, 0, 1, 1, 2, 2], 2, [0, 0, 1, 1, 2, 2]),  # every bin large enough
        ([0, 0, 1, 1, 2, 3], 2, [0, 0, 1, 1, 2, 2]),  # the largest joins the next smaller
        ([0, 1, 1, 2, 3, 4], 3, [0, 2, 2, 2, 2, 2]),  # cascades down, then the smallest joins it
        ([0, 1, 3, 3, 4, 4], 2, [0, 3, 3, 3, 4, 4]),  # the smallest joins the next larger
        ([0, 0, 0, 2], 2, [0, 0, 0, 2]),  # a lone positive bin stays itself
    ],
)
def test_pool_rare_bins(bins, min_count, expected):
    assert folds._pool_rare_bins(np.array(bins), min_count).tolist() == expected


def test_assign_folds_balances_and_keeps_groups():
    rng = np.random.default_rng(0)
    areas = np.where(rng.random(90) < 0.3, rng.integers(1, 50000, 90), 0)
    ids = [f"I{i}" for i in range(90)]
    table = folds.assign_folds(ids, areas, 3, seed=1, edges=EDGES)
    assert table["ImageId"].tolist() == ids
    assert table.groupby("fold").size().tolist() == [30, 30, 30]
    positives = table.groupby("fold")["has_mask"].sum()
    assert positives.max() - positives.min() <= 1
    groups = [f"P{i // 3}" if i % 10 else None for i in range(90)]  # every tenth image has no group
    grouped = folds.assign_folds(ids, areas, 3, seed=1, edges=EDGES, groups=groups)
    assert (grouped.groupby("group")["fold"].nunique() == 1).all()
    assert grouped.loc[0, "group"] == "I0"
    balance = folds.fold_balance(grouped, areas, EDGES)
    assert balance["fold"].tolist() == [0, 1, 2, "all"]
    assert balance.iloc[-1][["images", "positive"]].tolist() == [90, int((areas > 0).sum())]
    assert (balance[folds.bin_names(EDGES)].sum(axis=1) == balance["images"]).all()


def test_assign_folds_rejects_too_many_splits():
    with pytest.raises(ConfigError, match="at most the 2 groups"):
        folds.assign_folds(["a", "b", "c"], [0, 5, 0], 3, seed=0, edges=EDGES, groups=["x", "x", "y"])
    with pytest.raises(ConfigError, match="too few images to stratify"):
        folds.assign_folds(["a", "b"], [0, 5], 2, seed=0, edges=EDGES)
    with pytest.warns(UserWarning, match="least populated class"):  # one positive cannot reach both folds
        assert folds.assign_folds(["a", "b", "c"], [0, 0, 5], 2, seed=0, edges=EDGES)["fold"].nunique() == 2
