"""The winners' recipes (configs/siim_sneddy_1st*, configs/siim_amirassov_4th.yaml) load, keep their published
structure, and train one fold of the tiny synthetic data with that structure at tiny sizes."""

import json
from pathlib import Path

import numpy as np
import pytest

from pneumoseg import layout
from pneumoseg.config import fingerprint, load_config, to_dict
from pneumoseg.inference.fold_models import load_fold_models
from pneumoseg.modeling.checkpoints import best_files
from pneumoseg.postprocess.strategies import build_postprocessor
from pneumoseg.stages import train as train_stage
from pneumoseg.training.phases import phase_config, plan_phases
from synthetic import write_prepared

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZE = 32
# recipe -> (encoder, loss weights (bce, dice, focal), keep_best, predict.top_k)
RECIPES = {
    "siim_sneddy_1st/albunet_public.yaml": ("resnet34", (1.0, 1.0, 1.0), 3, 3),
    "siim_sneddy_1st/albunet_valid.yaml": ("resnet34", (3.0, 1.0, 4.0), 3, 3),
    "siim_sneddy_1st/seunet.yaml": ("se_resnext50_32x4d", (3.0, 1.0, 4.0), 3, 3),
    "siim_sneddy_1st/resnet50.yaml": ("resnet50", (2.0, 1.0, 2.0), 3, 3),
    "siim_amirassov_4th.yaml": ("resnet34", (3.0, 1.0, 0.0), 4, 4),
}


def _tiny(recipe: str, root: Path):
    """The recipe at tiny sizes: 32 px (its smaller phases at 16 px, its crops 16 px), one epoch per phase, random
    encoder weights, fold 0 of a synthetic dataset."""
    recipe_phases = load_config(CONFIGS / recipe).train.phases
    phases = to_dict(recipe_phases) if recipe_phases else []
    for phase in phases:
        if "image_size" in phase.get("train", {}):
            phase["train"]["image_size"] = SIZE // 2
    crop = ["data.train_crop=16"] if load_config(CONFIGS / recipe).data.train_crop else []
    return load_config(
        CONFIGS / recipe,
        [
            f"paths.input_dir={root / 'input'}",
            f"paths.output_root={root / 'output'}",
            f"data.image_size={SIZE}",
            f"prepare.sizes=[{SIZE // 2}, {SIZE}]",
            "model.params.encoder_weights=null",
            "train.epochs=1",
            "train.folds=[0]",
            "train.num_workers=0",
            "train.val_batch_size=8",
            "train.oof_size=16",
            "predict.num_workers=0",
            f"train.phases={json.dumps(phases) if phases else 'null'}",
            *crop,
        ],
    )


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_keeps_its_published_structure(recipe):
    encoder, weights, keep_best, top_k = RECIPES[recipe]
    cfg = load_config(CONFIGS / recipe)
    assert cfg.model.name == "Unet" and cfg.model.params.encoder_name == encoder
    assert cfg.model.params.encoder_weights == "imagenet"
    assert (cfg.loss.name, tuple(cfg.loss.params[k] for k in ("bce", "dice", "focal"))) == ("combo", weights)
    assert cfg.sampler.name == "positive_share" and cfg.sampler.params.start == 0.8
    assert (cfg.train.keep_best, cfg.predict.top_k, cfg.tta.hflip) == (keep_best, top_k, True)
    assert list(cfg.search.grids) == ["threshold", "triplet"] and cfg.search.grids.threshold is None


def test_the_4th_place_recipe_has_its_empty_branch_as_the_gate():
    cfg = load_config(CONFIGS / "siim_amirassov_4th.yaml")
    assert cfg.model.params.aux_params.classes == 1 and cfg.loss.gate_weight == 0.1
    # src/submit.py:make_rle: empty when p(non-empty) < 0.4 or fewer than 800 px of the 768 px map exceed 0.8, else
    # the pixels above 0.4; the reference block, and in the search's grids.
    inner = cfg.postprocess.params.inner.params
    assert cfg.postprocess.name == "gated" and cfg.postprocess.params.gate == 0.4
    assert (inner.top, inner.min_area, inner.bottom) == (0.8, 1422, 0.4) and 0.4 in cfg.search.gate_thresholds
    grid = cfg.search.grids.triplet
    assert 0.8 in grid.top and 1422 in grid.min_area and 0.4 in grid.bottom
    # 1422 px of the 1024 px image is "fewer than 800" at 768 px
    strategy = build_postprocessor(cfg.postprocess)
    probs = np.zeros((768, 768), np.float32)
    probs[:8, :100] = 0.9
    assert strategy(probs, 0.4).sum() == 800 and not strategy(probs, 0.39).any()
    probs[7, 99] = 0.5
    assert not strategy(probs, 0.9).any()


def test_the_sneddy_members_share_the_1st_place_base():
    shared = load_config(CONFIGS / "siim_sneddy_1st.yaml")
    assert shared.data.image_size == 1024
    seunet = load_config(CONFIGS / "siim_sneddy_1st/seunet.yaml")
    assert seunet.model.params.decoder_attention_type == "scse"
    assert {k: v for k, v in seunet.train.items()} == {k: v for k, v in shared.train.items()}


def _phase_settings(cfg):
    return [
        (
            phase.name,
            int(c.train.image_size),
            c.train.freeze_encoder_epochs,
            c.optimizer.params.lr,
            c.scheduler.name,
            c.sampler.params.start,
            c.sampler.params.end,
        )
        for phase in plan_phases(cfg)
        for c in [phase_config(cfg, phase, None)]
    ]


def test_the_sneddy_recipe_trains_part0_part1_part2_after_512_px():
    # part0 (1e-4, plateau, share 0.8) -> part1 (1e-5, cosine T_max 8, 0.6) -> part2 (0.4); uptrained from 512 px
    # with a frozen encoder first, except resnet50
    parts = [
        ("part1", 1024, 0, 1e-5, "cosine_annealing", 0.6, 0.6),
        ("part2", 1024, 0, 1e-5, "cosine_annealing", 0.4, 0.4),
    ]
    part0 = ("part0", 1024, 0, 1e-4, "plateau", 0.8, 0.8)
    for member in ("albunet_public", "albunet_valid", "seunet"):
        cfg = load_config(CONFIGS / f"siim_sneddy_1st/{member}.yaml")
        assert _phase_settings(cfg) == [
            ("part0_512", 512, 0, 1e-4, "plateau", 0.8, 0.8),
            part0[:2] + (2,) + part0[3:],
            *parts,
        ]
        assert 512 in cfg.prepare.sizes
    assert _phase_settings(load_config(CONFIGS / "siim_sneddy_1st/resnet50.yaml")) == [part0, *parts]
    blend = load_config(CONFIGS / "siim_sneddy_1st_ensemble.yaml")
    assert blend.postprocess.params == {
        "top": 0.7,
        "min_area": 800,
        "bottom": 0.3,
        "min_component_area": 100,
        "component_rule": "outline",
    }
    assert blend.search.grids.triplet.component_rule == "outline"


def test_the_4th_place_recipe_trains_on_crops_with_frozen_batchnorm_and_its_cosine():
    cfg = load_config(CONFIGS / "siim_amirassov_4th.yaml")
    assert (cfg.data.image_size, cfg.data.train_crop, cfg.data.crop_lesion_share) == (768, 512, 0.0)
    assert cfg.train.freeze_bn is True and cfg.train.phases is None
    assert cfg.scheduler == {"name": "cosine_annealing", "params": {"T_max": 8, "eta_min": 1.0e-6}}


def test_no_recipe_header_says_not_implemented():
    for path in [*CONFIGS.glob("siim_*.yaml"), *CONFIGS.glob("siim_sneddy_1st/*.yaml")]:
        text = path.read_text()
        assert "Not implemented" not in text and "Not reproduced (the code does not allow it)" not in text, path


@pytest.mark.slow
# albunet_public differs from albunet_valid only in its loss weights, which the test above checks.
@pytest.mark.parametrize("recipe", [r for r in RECIPES if not r.endswith("albunet_public.yaml")])
def test_a_recipe_trains_a_fold_at_tiny_sizes(recipe, tmp_path):
    cfg = _tiny(recipe, tmp_path)
    write_prepared(cfg.paths.prepared_dir, n_images=16, sizes=(SIZE // 2, SIZE), n_folds=2)
    summary = train_stage.run(cfg)
    assert summary["complete"] and summary["folds"][0]["epochs"] == 1
    # every phase ran, one epoch each
    phases = [phase.name for phase in plan_phases(cfg)]
    assert [p["name"] for p in summary["folds"][0].get("phases", [{"name": ""}])] == phases
    assert all(p["epochs"] == 1 for p in summary["folds"][0].get("phases", []))
    fold_dir = layout.fold_dir(cfg, 0)
    assert len(best_files(fold_dir)) == 1
    [model] = load_fold_models(layout.train_dir(cfg), [0])
    assert model.image_size == SIZE
    assert sum(p.numel() for p in model.net.parameters()) > 1e6  # the full encoder, not a tiny one


def test_the_demo_finetune_runs_a_small_phase_then_the_demos_size_with_a_frozen_encoder():
    demo, cfg = load_config(CONFIGS / "demo.yaml"), load_config(CONFIGS / "demo_finetune.yaml")
    small, full = plan_phases(cfg)
    assert phase_config(cfg, small, None).train.image_size == 64 in cfg.prepare.sizes
    last = phase_config(cfg, full, None)
    assert last.train.image_size == demo.train.image_size and last.train.freeze_encoder_epochs > 0
    # within the demo's budget: 64 px epochs cost about a quarter of 128 px ones
    assert phase_config(cfg, small, None).train.epochs / 4 + last.train.epochs <= demo.train.epochs
    assert cfg.paths.prepared_dir == demo.paths.prepared_dir


@pytest.mark.parametrize("name", ["demo_b", "demo_gate", "demo_finetune"])
def test_the_demos_configs_agree_on_the_prepared_data_they_share(name):
    """Running one of them must not leave another's stages stale: stages 01-02 record the same fingerprint."""
    demo, cfg = load_config(CONFIGS / "demo.yaml"), load_config(CONFIGS / f"{name}.yaml")
    assert cfg.paths.prepared_dir == demo.paths.prepared_dir
    for sections in (("prepare",), ("data", "folds")):
        assert fingerprint(cfg, sections) == fingerprint(demo, sections), sections
