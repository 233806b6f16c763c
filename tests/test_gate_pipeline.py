"""The tiny pipeline with the gate head on, stages 00 to 05 in-process: the head trains, its probability lands
beside every fold's OOF maps, stage 04 searches the gate and stage 05 predicts with the choice."""

import numpy as np
import pytest

from pneumoseg import layout
from pneumoseg.data import testset
from pneumoseg.data.probstore import ProbabilityStore
from pneumoseg.evaluation.submission import validate_submission
from pneumoseg.inference.predictor import Predictor
from pneumoseg.modeling.checkpoints import load_checkpoint
from pneumoseg.stages import convert, demo_data, predict, prepare_labels, search, train

pytestmark = pytest.mark.slow

GATE = [
    "model.params.aux_params={classes: 1, dropout: 0.2}",
    "loss.gate_weight=0.1",
    "search.gate_thresholds=[0.3, 0.5, 0.7]",
]


def test_the_tiny_pipeline_with_the_gate_reaches_stage_05(tiny_cfg):
    cfg = tiny_cfg(*GATE)
    for stage in (demo_data, convert, prepare_labels, train):
        stage.run(cfg)
    for fold in (0, 1):
        fold_dir = layout.fold_dir(cfg, fold)
        assert load_checkpoint(fold_dir / "best_1.pt")["model"]["params"]["aux_params"]["classes"] == 1
        store = ProbabilityStore(layout.oof_dir(fold_dir))
        assert store.gates is not None and store.gates.shape == (len(store),)
        assert np.all((store.gates > 0) & (store.gates < 1))

    numbers = search.run(cfg)
    gate = numbers["gate"]
    assert gate["thresholds"] == [0.3, 0.5, 0.7]
    assert gate["gated"]["block"]["name"] == "gated" and gate["ungated"]["block"]["name"] != "gated"
    summary = predict.run(cfg)
    assert summary["postprocess"] == Predictor.from_experiment(cfg, device="cpu").postprocessor.to_block()
    test, expected = testset.test_set(cfg)
    assert validate_submission(layout.submission_path(cfg), expected, testset.image_sizes(test)) == []

    # Stage 05 applies the gate: every pixel is above threshold 0, but no gate probability reaches 1.
    everything = "{name: threshold, params: {threshold: 0.0}}"
    for gate_threshold, positive in ((0.0, int(cfg.demo.n_test)), (1.0, 0)):
        gated = tiny_cfg(
            *GATE,
            "postprocess.source=config",
            "postprocess.name=gated",
            f"postprocess.params={{gate: {gate_threshold}, inner: {everything}}}",
        )
        summary = predict.run(gated, force=True)
        assert summary["positive"] == positive
        assert summary["gate_emptied"] == int(cfg.demo.n_test) - positive  # every image had a mask to lose
        assert "emptied by the gate" in predict.summary_text(summary)
