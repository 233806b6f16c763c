import numpy as np
import pytest

from pneumoseg.data.probstore import ProbabilityStore, ProbabilityWriter, dequantize, quantize
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.evaluation.metrics import competition_dice, dice_per_image
from pneumoseg.io import atomic_open, read_png, write_png
from pneumoseg.registry import Registry
from pneumoseg.stage_table import require_finished
from pneumoseg.stages.record import StageRecord


def test_atomic_open_keeps_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_png_round_trip_and_missing_png(tmp_path):
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    write_png(tmp_path / "x.png", image)
    assert (read_png(tmp_path / "x.png") == image).all()
    with pytest.raises(DataError, match="cannot read image"):
        read_png(tmp_path / "missing.png")


def _masks(*rows):
    return np.array([[list(r)] for r in rows], dtype=bool)


@pytest.mark.parametrize(
    "pred, true, expected",
    [
        (_masks([1, 1, 0, 0]), _masks([1, 1, 0, 0]), 1.0),  # perfect
        (_masks([0, 0, 0, 0]), _masks([0, 0, 0, 0]), 1.0),  # both empty counts as 1
        (_masks([1, 1, 0, 0]), _masks([0, 0, 1, 1]), 0.0),  # disjoint
        (_masks([1, 1, 0, 0]), _masks([0, 1, 1, 0]), 0.5),  # half overlap
        (_masks([1, 0, 0, 0]), _masks([0, 0, 0, 0]), 0.0),  # false positive on an empty image
        (_masks([0, 0, 0, 0]), _masks([1, 0, 0, 0]), 0.0),  # missed lesion
        (_masks([1, 1, 0, 0], [0, 0, 0, 0]), _masks([0, 1, 1, 0], [0, 0, 0, 0]), 0.75),  # mean over images
    ],
)
def test_competition_dice(pred, true, expected):
    assert competition_dice(pred, true) == pytest.approx(expected)


def test_dice_per_image_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        dice_per_image(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5), bool))


def test_registry_builds_blocks_and_names_unknowns():
    reg = Registry("widget")
    reg.register("pair")(lambda a, b=1: (a, b))
    assert reg.build({"name": "pair", "params": {"a": 3}}) == (3, 1)
    with pytest.raises(ConfigError, match="unknown widget 'nope'; known: pair"):
        reg.build({"name": "nope"})
    with pytest.raises(ConfigError, match="bad params"):
        reg.build({"name": "pair", "params": {"c": 1}})


def test_probability_store_round_trip_and_crash(tmp_path):
    probs = np.random.default_rng(0).random((5, 8, 8))
    with ProbabilityWriter(tmp_path / "ok", list("abcde"), 8) as writer:
        writer.write(0, probs[:3])
        writer.write(3, probs[3:])
    store = ProbabilityStore(tmp_path / "ok")
    assert store.ids == list("abcde")
    restored = np.concatenate([maps for _, maps in store.chunks(2)])
    assert np.abs(dequantize(restored) - probs).max() <= 0.5 / 255 + 1e-6
    assert (quantize(np.array([0.0, 1.0])) == [0, 255]).all()

    with pytest.raises(RuntimeError), ProbabilityWriter(tmp_path / "crash", ["a"], 8) as writer:
        raise RuntimeError("killed")
    with pytest.raises(DataError, match="no complete probability store"):
        ProbabilityStore(tmp_path / "crash")


def test_stage_record_skips_only_for_the_same_config(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    record = StageRecord("99_test", tmp_path / "stage", cfg, ["folds"])
    assert not record.skip_if_complete(force=False)
    record.start()
    assert (tmp_path / "stage" / "config.yaml").is_file()
    record.finish({"n": 1})
    assert StageRecord("99_test", tmp_path / "stage", cfg, ["folds"]).skip_if_complete(force=False)
    assert not StageRecord("99_test", tmp_path / "stage", cfg, ["folds"]).skip_if_complete(force=True)
    changed = tiny_cfg("folds.n_splits=4")
    assert not StageRecord("99_test", tmp_path / "stage", changed, ["folds"]).skip_if_complete(force=False)


def test_require_finished_names_the_missing_done_file_and_the_script(tiny_cfg, tmp_path):
    folder = tmp_path / "stage"
    with pytest.raises(
        DataError,
        match=r"stage 03 has not finished: .*stage[/\\]done.json is missing\. "
        r"Run scripts/03_train\.py first",
    ):
        require_finished(folder, "03")
    with pytest.raises(DataError, match=r"member a has not finished: .* Run the members first"):
        require_finished(folder, "03", "member a", "the members")
    StageRecord("99_test", folder, tiny_cfg(), ["folds"]).finish()
    assert require_finished(folder, "03") == folder / "done.json"
