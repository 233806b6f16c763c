"""Ensembles across experiments: the config, the blend, stage 04 on blended OOF maps, stage 05, the package and the
server, on two tiny member experiments of different sizes and weights."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from fake_experiment import write_fake_training
from pneumoseg import layout
from pneumoseg.config import ensemble_members, load_config
from pneumoseg.data import rle
from pneumoseg.data.blend import blend_gates, blend_maps, weighted_mean
from pneumoseg.data.labels import ImageLabels
from pneumoseg.data.probstore import ProbabilityWriter
from pneumoseg.data.resize import resize_probabilities
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.evaluation import leaderboard
from pneumoseg.evaluation.metrics import dice_per_image
from pneumoseg.evaluation.submission import read_submission
from pneumoseg.inference import folder as predict_command
from pneumoseg.inference.experiments import build_predictor
from pneumoseg.inference.predictor import EnsemblePredictor, Predictor
from pneumoseg.io import read_png, write_csv, write_json, write_text
from pneumoseg.postprocess.images import BlendedImages, OofImages
from pneumoseg.postprocess.strategies import build_postprocessor
from pneumoseg.serve import package as package_format
from pneumoseg.stages import ensemble
from pneumoseg.stages import package as package_stage
from pneumoseg.stages import predict as predict_stage
from pneumoseg.stages import search as search_stage
from pneumoseg.stages.record import StageRecord
from serve_client import call, running_server
from synthetic import write_prepared
from synthetic_oof import write_oof_experiment

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
THRESHOLD = {"name": "threshold", "params": {"threshold": 0.5, "min_area": 0.0}}


def write_ensemble(tmp_path: Path, weights=(1, 3), member_b=("train.image_size=32",), members=None) -> Path:
    """An ensemble config of two tiny members under ``tmp_path`` (``tiny_a`` at 64 px, ``tiny_b`` as ``member_b``
    says), both on the same prepared data; returns its file."""
    paths = [f"paths.input_dir={tmp_path / 'input'}", f"paths.output_root={tmp_path / 'output'}"]
    members = (
        members
        if members is not None
        else [
            {"config": str(TINY), "weight": weights[0], "overrides": [*paths, "experiment=tiny_a"]},
            {"config": str(TINY), "weight": weights[1], "overrides": [*paths, "experiment=tiny_b", *member_b]},
        ]
    )
    path = tmp_path / "ensemble.yaml"
    OmegaConf.save(
        OmegaConf.create(
            {
                "base": str(TINY),
                "experiment": "tiny_ensemble",
                "prepare": {"sizes": [64, 32]},
                "paths": {"input_dir": str(tmp_path / "input"), "output_root": str(tmp_path / "output")},
                "ensemble": {"members": members},
            }
        ),
        path,
    )
    return path


# --- the config --------------------------------------------------------------------------------------------------


def test_members_load_with_their_overrides_and_weights(tmp_path):
    cfg = load_config(write_ensemble(tmp_path))
    a, b = ensemble_members(cfg)
    assert (a.name, a.weight, a.cfg.train.image_size) == ("tiny_a", 1.0, 64)
    assert (b.name, b.weight, b.cfg.train.image_size) == ("tiny_b", 3.0, 32)
    assert str(a.cfg.paths.experiment_dir) == str(tmp_path / "output" / "tiny_a")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda m: m[1].update(config="configs/no_such_member.yaml"),
            r"members\[1\]: member config "
            r"configs/no_such_member.yaml not found",
        ),
        (lambda m: m[0].update(weight=0), r"members\[0\]: weight must be a positive number, got 0"),
        (lambda m: m[0].update(weight=-2), "weight must be a positive number"),
        (lambda m: m[0].update(weight="heavy"), "weight must be a positive number"),
        (lambda m: m.pop(), "at least two member experiments"),
        (
            lambda m: m[1].update(overrides=[o.replace("tiny_b", "tiny_a") for o in m[1]["overrides"]]),
            "as member 'tiny_a' does",
        ),
        (lambda m: m[0].update(colour="red"), "must be a mapping with a config file"),
        (lambda m: m[0]["overrides"].append("train.no_such_key=1"), r"members\[0\]: override"),
    ],
)
def test_bad_members_are_config_errors_naming_the_ensemble_file(tmp_path, change, message):
    path = write_ensemble(tmp_path)
    raw = OmegaConf.to_container(OmegaConf.load(path))
    change(raw["ensemble"]["members"])
    OmegaConf.save(OmegaConf.create(raw), path)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_a_member_that_is_an_ensemble_is_refused(tmp_path):
    inner = write_ensemble(tmp_path)
    outer = tmp_path / "outer.yaml"
    OmegaConf.save(
        OmegaConf.create(
            {
                "base": str(inner),
                "experiment": "outer",
                "ensemble": {"members": [{"config": str(inner)}, {"config": str(TINY), "overrides": ["experiment=x"]}]},
            }
        ),
        outer,
    )
    with pytest.raises(ConfigError, match="is an ensemble itself"):
        load_config(outer)


# --- the blend ---------------------------------------------------------------------------------------------------


def test_blend_equals_a_hand_computed_weighted_average_of_maps_of_different_sizes():
    rng = np.random.default_rng(0)
    small, large = rng.random((16, 16), np.float32), rng.random((48, 48), np.float32)
    blended = blend_maps([small, large], [1, 3], 96, 80)
    # By hand: each map enlarged bilinearly to the image's 96 x 80, then (1 * a + 3 * b) / 4.
    a = cv2.resize(small, (80, 96), interpolation=cv2.INTER_LINEAR)
    b = cv2.resize(large, (80, 96), interpolation=cv2.INTER_LINEAR)
    assert blended.dtype == np.float32 and blended.shape == (96, 80)
    np.testing.assert_allclose(blended, (a + 3 * b) / 4, rtol=0, atol=1e-6)
    # One member with any weight is that member's map, bit for bit.
    np.testing.assert_array_equal(
        blend_maps([large], [7], 96, 80), cv2.resize(large, (80, 96), interpolation=cv2.INTER_LINEAR)
    )
    # Per-image values (a gate's probability) blend with the same weights.
    assert float(weighted_mean([0.2, 0.6], [1, 3])) == pytest.approx(0.5)


@pytest.mark.parametrize("shape", [(96, 80), (8, 8)])  # enlarged (bilinear) and shrunk (area averaging)
def test_maps_of_one_size_blended_before_the_resize_equal_each_resized_then_blended(shape):
    rng = np.random.default_rng(2)
    maps = [rng.random((16, 16), np.float32) for _ in range(3)] + [rng.random((24, 24), np.float32)]
    originals = [m.copy() for m in maps]
    weights = [1, 2, 3, 4]
    one_by_one = sum(w * resize_probabilities(m, *shape) for w, m in zip(weights, maps)) / sum(weights)
    np.testing.assert_allclose(blend_maps(maps, weights, *shape), one_by_one, rtol=0, atol=1e-6)
    for given, original in zip(maps, originals):
        np.testing.assert_array_equal(given, original)  # the members' maps are left as they were


@pytest.mark.parametrize("weights", [[1, 0], [1, -1], [1, float("nan")], []])
def test_weights_must_be_positive(weights):
    with pytest.raises(ConfigError, match="positive"):
        weighted_mean([np.zeros(2)] * len(weights), weights)


def test_blended_oof_images_equal_the_hand_blend_with_the_first_members_truth(tmp_path):
    rng = np.random.default_rng(1)
    ids = [f"img{k}" for k in range(5)]
    levels = {
        16: rng.integers(0, 256, (5, 16, 16), dtype=np.uint8),
        40: rng.integers(0, 256, (5, 40, 40), dtype=np.uint8),
    }
    for size, maps in levels.items():
        with ProbabilityWriter(tmp_path / str(size), ids, size) as writer:
            writer.write(0, maps)
    diagonal = rle.encode(np.eye(64, dtype=bool))
    labels = [
        ImageLabels(image_id, Path("train-rle.csv"), (diagonal,) if k % 2 else (), (k,) if k % 2 else (), 1, k)
        for k, image_id in enumerate(ids)
    ]
    members = [OofImages([(tmp_path / str(size), 0, 5)], labels, [(64, 64)] * 5) for size in levels]
    source = BlendedImages(members, [2.0, 1.0])
    found = list(source.part(1, 4))
    assert len(source) == 5 and len(found) == 3
    for k, (blend, truth) in zip(range(1, 4), found):
        a = cv2.resize(levels[16][k].astype(np.float32) / 255, (64, 64), interpolation=cv2.INTER_LINEAR)
        b = cv2.resize(levels[40][k].astype(np.float32) / 255, (64, 64), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(blend, (2 * a + b) / 3, rtol=0, atol=1e-6)
        assert truth.shape == (64, 64) and truth.any() == bool(k % 2)


def test_candidates_are_members_pairs_and_all_and_the_best_nested_score_wins():
    assert ensemble.combinations(2) == [(0,), (1,), (0, 1)]
    assert ensemble.combinations(3) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    candidates = [
        {"oof_score": 0.90, "nested_score": 0.80},
        {"oof_score": 0.85, "nested_score": 0.84},
        {"oof_score": 0.95, "nested_score": 0.84},
        {"oof_score": 0.99, "nested_score": None},
    ]
    assert ensemble.best_candidate(candidates[:3]) == 1  # by nested, not OOF; the first of equals
    assert ensemble.best_candidate([{"oof_score": 0.7, "nested_score": None}, candidates[3]]) == 1


# --- stage 04 ----------------------------------------------------------------------------------------------------


def _oof_members(tmp_path, weights=(1, 3)):
    """The ensemble config and two members with synthetic OOF stores of 32 and 48 px over the same images."""
    cfg = load_config(write_ensemble(tmp_path, weights))
    members = ensemble_members(cfg)
    for member, oof_size in zip(members, (32, 48)):
        write_oof_experiment(member.cfg, n_images=40, oof_size=oof_size, seed=0)
        StageRecord("03_train", layout.train_dir(member.cfg), member.cfg, ()).finish({})
    return cfg, members


def _hand_dice(members, weights, strategy) -> float:
    """Mean Dice of ``strategy`` on the hand-made blend: each member's stored map dequantised, enlarged bilinearly
    to the image's 128 px, weighted mean; truth from train-rle.csv."""
    truth_rle = pd.read_csv(Path(members[0].cfg.paths.input_dir) / "train-rle.csv", dtype=str).set_index("ImageId")
    dice = []
    for fold in (0, 1):
        stores = [layout.oof_dir(layout.fold_dir(m.cfg, fold)) for m in members]
        ids = pd.read_csv(stores[0] / "ids.csv", dtype=str)["ImageId"]
        maps = [np.load(store / "probs.npy") for store in stores]
        for k, image_id in enumerate(ids):
            full = [cv2.resize(m[k].astype(np.float32) / 255, (128, 128), interpolation=cv2.INTER_LINEAR) for m in maps]
            blend = sum(w * f for w, f in zip(weights, full)) / sum(weights)
            truth = rle.decode(truth_rle.loc[image_id, "EncodedPixels"], 128, 128)
            dice.append(dice_per_image(strategy(blend.astype(np.float32)), truth)[0])
    return float(np.mean(dice))


def test_stage_04_scores_members_and_pair_and_picks_by_nested_score(tmp_path):
    cfg, members = _oof_members(tmp_path)
    numbers = search_stage.run(cfg)
    folder = layout.search_dir(cfg)
    choice = json.loads(layout.ensemble_path(cfg).read_text())
    candidates = choice["candidates"]
    assert [c["members"] for c in candidates] == [["tiny_a"], ["tiny_b"], ["tiny_a", "tiny_b"]]
    assert [c["weights"] for c in candidates] == [[1.0], [3.0], [1.0, 3.0]]
    best = ensemble.best_candidate(candidates)
    assert choice["chosen"] == candidates[best]
    assert candidates[best]["nested_score"] == max(c["nested_score"] for c in candidates)
    # What is reported is the chosen blend's, and thresholds.json is its post-processing.
    assert numbers["oof_score"] == pytest.approx(candidates[best]["oof_score"], abs=1e-12)
    assert numbers["nested_score"] == pytest.approx(candidates[best]["nested_score"], abs=1e-12)
    thresholds = json.loads(layout.thresholds_path(cfg).read_text())
    assert {"name": thresholds["name"], "params": thresholds["params"]} == candidates[best]["postprocess"]
    # Every candidate's OOF score is that of its post-processing on the hand-made blend of its members.
    for candidate in candidates:
        chosen = [m for m in members if m.name in candidate["members"]]
        expected = _hand_dice(chosen, candidate["weights"], build_postprocessor(candidate["postprocess"]))
        assert candidate["oof_score"] == pytest.approx(expected, abs=1e-4)
    report = (folder / "oof_report.md").read_text()
    assert "## Ensemble" in report and "tiny_a + tiny_b" in report
    assert f"{candidates[2]['nested_score']:.4f}" in report and "(chosen)" in report
    assert json.loads(layout.oof_report_path(cfg).read_text())["ensemble"]["chosen"] == candidates[best]
    assert search_stage.run(cfg)["members"] == candidates[best]["members"]  # complete: skipped


def test_stage_04_refuses_members_trained_on_other_folds(tmp_path):
    cfg, members = _oof_members(tmp_path)
    folds_csv = layout.train_folds_path(members[1].cfg)
    table = pd.read_csv(folds_csv, dtype={"ImageId": str})
    table["fold"] = 1 - table["fold"]
    write_csv(folds_csv, table)
    with pytest.raises(DataError, match="trained on different folds") as caught:
        search_stage.run(cfg)
    assert str(folds_csv) in str(caught.value) and "--force" in str(caught.value)


def test_stage_04_refuses_an_untrained_member(tmp_path):
    cfg, members = _oof_members(tmp_path)
    (layout.train_dir(members[1].cfg) / "done.json").unlink()
    with pytest.raises(DataError, match="stage 03 of ensemble member 'tiny_b' has not finished"):
        search_stage.run(cfg)


def test_stage_04_refuses_a_member_on_other_data(tmp_path):
    cfg = load_config(write_ensemble(tmp_path, member_b=("data.name=other",)))
    for member in ensemble_members(cfg):
        write_csv(layout.train_folds_path(member.cfg), pd.DataFrame({"ImageId": ["a"], "fold": [0]}))
        StageRecord("03_train", layout.train_dir(member.cfg), member.cfg, ()).finish({})
    with pytest.raises(DataError, match="members must share the ensemble's data"):
        search_stage.run(cfg)


# --- stages 05 and 06, the server ---------------------------------------------------------------------------------


@pytest.fixture
def trained_ensemble(tmp_path):
    """Two untrained tiny members (64 and 32 px, weights 1 and 3) on one prepared data set with 64 and 32 px PNGs,
    and the ensemble's stage 04 choice (both members, a threshold)."""
    cfg = load_config(write_ensemble(tmp_path))
    members = ensemble_members(cfg)
    folds = write_prepared(cfg.paths.prepared_dir, n_images=4, sizes=(64, 32), n_folds=2, n_test=5, seed=3)
    for seed, member in enumerate(members):
        write_fake_training(member.cfg, seed=10 * seed)
        write_csv(layout.train_folds_path(member.cfg), folds)
    write_json(layout.thresholds_path(cfg), THRESHOLD)
    candidate = {
        "members": ["tiny_a", "tiny_b"],
        "weights": [1.0, 3.0],
        "oof_score": 0.5,
        "nested_score": 0.5,
        "postprocess": THRESHOLD,
    }
    ensemble.write_choice(cfg, members, [candidate], 0)
    return cfg, members


def _hand_predictions(members, weights, images_by_size, shapes):
    """Each member's own predictor on its own PNGs, the maps blended by hand and thresholded at 0.5."""
    maps = [
        Predictor.from_experiment(m.cfg, device="cpu").probabilities_prepared(
            images_by_size[int(m.cfg.train.image_size)], shapes
        )[0]
        for m in members
    ]
    return [sum(w * m[k] for w, m in zip(weights, maps)) / sum(weights) > 0.5 for k in range(len(shapes))]


def test_stage_05_predicts_with_every_member_at_its_own_size_and_blends(trained_ensemble):
    cfg, members = trained_ensemble
    summary = predict_stage.run(cfg)
    assert summary["models"] == 4 and summary["images"] == 5
    test = pd.read_csv(layout.test_images_path(cfg), dtype={"ImageId": str})
    images = {
        size: np.stack([read_png(layout.images_dir(cfg, size) / f"{i}.png") for i in test["ImageId"]])
        for size in (64, 32)
    }
    shapes = list(zip(test["rows"], test["cols"]))
    expected = _hand_predictions(members, [1, 3], images, shapes)
    submission = pd.read_csv(layout.submission_path(cfg), dtype=str)
    assert submission["ImageId"].tolist() == test["ImageId"].tolist()
    for row, mask, (rows, cols) in zip(submission["EncodedPixels"], expected, shapes):
        found = rle.decode(row, int(rows), int(cols)) if row.strip() != "-1" else np.zeros((rows, cols), bool)
        assert (found != mask).mean() < 1e-3  # float32 sums taken in another order
    assert any(row.strip() != "-1" for row in submission["EncodedPixels"])


def test_stage_05_refuses_an_ensemble_without_stage_04(trained_ensemble):
    cfg, _ = trained_ensemble
    layout.ensemble_path(cfg).unlink()
    with pytest.raises(DataError, match="stage 04 has not chosen the ensemble's members"):
        predict_stage.run(cfg)


def test_stage_05_uses_only_the_chosen_members(trained_ensemble):
    cfg, members = trained_ensemble
    candidate = {
        "members": ["tiny_b"],
        "weights": [3.0],
        "oof_score": 0.5,
        "nested_score": 0.5,
        "postprocess": THRESHOLD,
    }
    ensemble.write_choice(cfg, members, [candidate], 0)
    predictor = build_predictor(cfg, device="cpu")
    assert predictor.names == ["tiny_b"] and predictor.image_sizes == (32,)
    assert predict_stage.run(cfg)["models"] == 2


def _predict_folder(config: Path, images: Path, output: Path) -> int:
    """``pneumoseg predict --model CONFIG`` on a folder of images, decoding in this process; its exit code."""
    return predict_command.main(
        ["--model", str(config), "--input", str(images), "--output", str(output), "--workers", "0"]
    )


@pytest.mark.slow  # stage 05, then the command, on 5 images: about 7 s
def test_the_predict_command_on_the_ensemble_config_gives_exactly_stage_05s_masks(trained_ensemble, tmp_path):
    cfg, _ = trained_ensemble
    predict_stage.run(cfg)
    submission = {row.image_id: row.encoded for row in read_submission(layout.submission_path(cfg))[0]}
    images = tmp_path / "new_xrays"
    images.mkdir()
    for image_id in submission:  # the test images at their original size (64 px) as new X-rays
        shutil.copy(layout.images_dir(cfg, 64) / f"{image_id}.png", images / f"{image_id}.png")
    assert _predict_folder(tmp_path / "ensemble.yaml", images, tmp_path / "out") == 0
    with open(tmp_path / "out" / predict_command.PREDICTIONS_FILE, newline="") as handle:
        found = {Path(row["source"]).stem: row["EncodedPixels"] for row in csv.DictReader(handle)}
    assert found == submission
    assert any(encoded != "-1" for encoded in found.values())  # masks, not only empty images


def test_the_ensemble_configs_model_is_versioned_by_its_chosen_members(trained_ensemble, tmp_path, monkeypatch):
    cfg, members = trained_ensemble
    with predict_command.open_model(tmp_path / "ensemble.yaml", device="cpu") as model:
        assert isinstance(model.predictor, EnsemblePredictor) and model.predictor.names == ["tiny_a", "tiny_b"]
        assert (model.name, model.fmt) == ("tiny_ensemble", str(cfg.predict.fmt))
        assert model.version == f"tiny_ensemble-{predict_command.config_version(cfg)[:12]}"
    both = predict_command.config_version(cfg)
    retrained = [replace(members[0], cfg=OmegaConf.merge(members[0].cfg, {"train": {"epochs": 9}})), members[1]]
    reweighted = [replace(members[0], weight=2.0), members[1]]
    only_b = {"members": ["tiny_b"], "weights": [3.0], "oof_score": 0.5, "nested_score": 0.5, "postprocess": THRESHOLD}
    ensemble.write_choice(cfg, members, [only_b], 0)
    versions = [predict_command.config_version(cfg)]
    for chosen in (retrained, reweighted):
        with monkeypatch.context() as patch:
            patch.setattr(predict_command, "chosen_members", lambda _, chosen=chosen: chosen)
            versions.append(predict_command.config_version(cfg))
    assert len({both, *versions}) == 4


@pytest.mark.parametrize(
    "undo, script",
    [
        (lambda cfg, members: layout.ensemble_path(cfg), "scripts/04_search_thresholds.py on the ensemble config"),
        (lambda cfg, members: layout.train_dir(members[1].cfg) / "done.json", "scripts/train_members.py"),
    ],
    ids=["no stage 04", "a member without stage 03"],
)
def test_the_predict_command_names_an_ensembles_unfinished_stage(trained_ensemble, tmp_path, caplog, undo, script):
    cfg, members = trained_ensemble
    missing = undo(cfg, members)
    missing.unlink()
    (tmp_path / "new_xrays").mkdir()
    assert _predict_folder(tmp_path / "ensemble.yaml", tmp_path / "new_xrays", tmp_path / "out") == 1
    [error] = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert str(missing) in error and script in error and "\n" not in error
    assert "Traceback" not in caplog.text


def test_package_and_server_round_trip_on_the_ensemble(trained_ensemble, tmp_path):
    cfg, members = trained_ensemble
    summary = package_stage.run(cfg)
    manifest = json.loads((layout.package_dir(cfg) / "manifest.json").read_text())
    assert [m["name"] for m in manifest["members"]] == ["tiny_a", "tiny_b"]
    assert [m["weight"] for m in manifest["members"]] == [1.0, 3.0]
    assert [m["image_size"] for m in manifest["members"]] == [64, 32]
    assert summary["models"] == [
        "tiny_a/fold0/best_1.pt",
        "tiny_a/fold1/best_1.pt",
        "tiny_b/fold0/best_1.pt",
        "tiny_b/fold1/best_1.pt",
    ]
    assert all(len(m["sha256"]) == 64 for m in manifest["models"])
    image = np.random.default_rng(5).integers(0, 256, (70, 90), dtype=np.uint8)
    [expected] = build_predictor(cfg, device="cpu").predict([image])
    with package_format.open_package(layout.package_path(cfg)) as folder:
        assert (folder / "tiny_b" / "config.yaml").is_file()
        loaded = package_format.load_package(folder, device="cpu", runtime="torch")
        served = package_format.load_package(folder, device="cpu")  # auto: every member's ONNX models
    assert isinstance(loaded.predictor, EnsemblePredictor)
    [found] = loaded.predictor.predict([image])
    np.testing.assert_array_equal(found.probs, expected.probs)
    assert served.runtime == "onnxruntime" and all(
        entry["onnx"]["file"].endswith(".onnx") for entry in manifest["models"]
    )
    [found] = served.predictor.predict([image])
    np.testing.assert_allclose(found.probs, expected.probs, atol=1e-5)

    buffer = cv2.imencode(".png", image)[1].tobytes()
    with running_server(layout.package_path(cfg), tmp_path / "server.log") as server:
        status, _, body = call(server.port, "POST", "/invocations", buffer, {"Content-Type": "image/png"})
    assert status == 200
    answer = json.loads(body)
    assert answer["EncodedPixels"] == expected.rle() and answer["model"]["version"] == manifest["version"]


def test_a_package_member_with_a_bad_weight_or_other_files_is_refused(trained_ensemble):
    cfg, _ = trained_ensemble
    package_stage.run(cfg)
    with package_format.open_package(layout.package_path(cfg)) as folder:
        manifest = json.loads((folder / "manifest.json").read_text())
        copy = Path(str(folder) + "_copy")
        shutil.copytree(folder, copy)
    manifest["members"][1]["weight"] = 0
    write_text(copy / "manifest.json", json.dumps(manifest))
    with pytest.raises(DataError, match="member 'tiny_b' has the weight 0"):
        package_format.load_package(copy, device="cpu")
    manifest["members"][1]["weight"] = 1
    manifest["members"][1]["models"] = manifest["members"][1]["models"][:1]
    write_text(copy / "manifest.json", json.dumps(manifest))
    with pytest.raises(DataError, match="each exactly once"):
        package_format.load_package(copy, device="cpu")


def test_the_leaderboard_lists_the_ensemble_with_its_members_sums(trained_ensemble, tmp_path):
    cfg, members = trained_ensemble
    for member, seconds in zip(members, (60.0, 30.0)):
        record = StageRecord("03_train", layout.train_dir(member.cfg), member.cfg, ())
        record.start()
        record.finish({"fold_summaries": {"0": {"seconds": seconds}, "1": {"seconds": seconds}}})
    # A member without a stage 04 of its own is still summed into the ensemble; with one it is listed too.
    _finish(layout.search_dir(members[0].cfg), members[0].cfg, {"oof_score": 0.7, "nested_score": 0.6})
    _finish(layout.search_dir(cfg), cfg, {"oof_score": 0.8, "nested_score": 0.75, "members": ["tiny_a", "tiny_b"]})
    runs = {run.name: run for run in leaderboard.collect(tmp_path / "output")}
    assert set(runs) == {"tiny_a", "tiny_ensemble"}
    whole, a = runs["tiny_ensemble"], runs["tiny_a"]
    assert whole.members == ["tiny_a", "tiny_b"] and not a.members
    assert whole.train_seconds == 180.0 == a.train_seconds + 60.0
    b_files = sorted(layout.train_dir(members[1].cfg).rglob("best_*.pt"))
    assert whole.parameters == 2 * a.parameters > 0  # the members share an architecture
    assert whole.checkpoint_bytes == a.checkpoint_bytes + sum(f.stat().st_size for f in b_files)
    assert whole.checkpoints == "tiny_a: best, 1 per fold, 2 folds + tiny_b: best, 1 per fold, 2 folds"
    table = leaderboard.markdown(leaderboard.sort_runs(runs.values()))
    assert table.index("tiny_ensemble (ensemble: tiny_a + tiny_b)") < table.index("| tiny_a |")


def _finish(folder: Path, cfg, summary: dict) -> None:
    """A finished stage 04 record (its config.yaml and done.json) with ``summary``."""
    record = StageRecord("04_search", folder, cfg, ())
    record.start()
    record.finish({**summary, "chosen": THRESHOLD})


def test_the_shipped_ensembles_load_with_their_members():
    demo = ensemble_members(load_config(ROOT / "configs" / "demo_ensemble.yaml"))
    assert [(m.name, m.cfg.model.params.encoder_name) for m in demo] == [
        ("demo", "tu-resnet10t"),
        ("demo_b", "mobilenet_v2"),
    ]
    sneddy = ensemble_members(load_config(ROOT / "configs" / "siim_sneddy_1st_ensemble.yaml"))
    assert [m.weight for m in sneddy] == [0.4, 0.2, 0.2, 0.2]
    assert len({str(m.cfg.paths.prepared_dir) for m in sneddy}) == 1


def test_gate_blend_weighs_only_the_members_with_a_gate_head():
    with_head, other = np.array([0.2, 0.8], np.float32), np.array([0.6, 0.0], np.float32)
    blended = blend_gates([with_head, None, other], [1.0, 5.0, 3.0])
    np.testing.assert_allclose(blended, (1 * with_head + 3 * other) / 4, atol=1e-7)
    assert blend_gates([None, None], [1.0, 1.0]) is None
