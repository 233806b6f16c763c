import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pneumoseg.config import fingerprint, load_config, save_config
from pneumoseg.errors import ConfigError


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def chain(tmp_path):
    write(tmp_path / "base.yaml", "experiment: base\ntrain:\n  lr: 0.1\n  epochs: 10\nname: ${experiment}-run\n")
    write(tmp_path / "mid.yaml", "base: base.yaml\ntrain:\n  epochs: 5\n")
    return write(tmp_path / "top.yaml", "base: mid.yaml\nexperiment: top\n")


def test_bases_chain_and_interpolations_resolve(chain):
    cfg = load_config(chain)
    assert cfg.train.lr == 0.1 and cfg.train.epochs == 5
    assert cfg.name == "top-run"
    assert "base" not in cfg


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("train.lr=0.5", "train.lr", 0.5),
        ("train.epochs=null", "train.epochs", None),
        ("+train.extra=[1, 2]", "train.extra", [1, 2]),
        ("experiment=other", "name", "other-run"),
    ],
)
def test_overrides(chain, override, key, value):
    cfg = load_config(chain, [override])
    assert OmegaConf.select(cfg, key) == value


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=0.5", "no config key 'train.lrr'"),
        ("train.lr", "not of the form key=value"),
    ],
)
def test_bad_overrides_are_clear(chain, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(chain, [override])


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_resolved_config_is_saved_and_reloads_identically(chain, tmp_path):
    cfg = load_config(chain, ["train.lr=0.3"])
    path = save_config(cfg, tmp_path / "out")
    assert load_config(path) == cfg


def test_fingerprint_depends_only_on_named_sections(chain):
    cfg = load_config(chain)
    same = load_config(chain, ["experiment=elsewhere"])
    changed = load_config(chain, ["train.lr=0.2"])
    assert fingerprint(cfg, ["train"]) == fingerprint(same, ["train"])
    assert fingerprint(cfg, ["train"]) != fingerprint(changed, ["train"])
    assert fingerprint(cfg, ["train"], {"n": 1}) != fingerprint(cfg, ["train"], {"n": 2})


@pytest.mark.parametrize("name", ["demo.yaml", "tiny.yaml", "siim_unet_r34_512.yaml", "base.yaml"])
def test_shipped_configs_load(name):
    from conftest import ROOT

    cfg = load_config(ROOT / "configs" / name)
    assert cfg.paths.experiment_dir.endswith(cfg.experiment)


@pytest.fixture
def blocks(tmp_path):
    """A base with a ``{name, params}`` block, and an experiment that renames it (with params of its own)."""
    write(
        tmp_path / "base.yaml",
        "scheduler:\n  name: plateau\n  params: {patience: 3, factor: 0.5}\n"
        "loss:\n  name: mixed\n  params: {alpha: 10.0}\n",
    )
    write(tmp_path / "cosine.yaml", "base: base.yaml\nscheduler:\n  name: cosine\n  params: {warmup_epochs: 2}\n")
    return tmp_path


def test_block_renamed_in_a_config_file_takes_only_its_own_params(blocks):
    cfg = load_config(blocks / "cosine.yaml")
    assert OmegaConf.to_container(cfg.scheduler) == {"name": "cosine", "params": {"warmup_epochs": 2}}
    assert OmegaConf.to_container(cfg.loss) == {"name": "mixed", "params": {"alpha": 10.0}}
    write(blocks / "bare.yaml", "base: base.yaml\nloss: {name: combo}\n")
    assert OmegaConf.to_container(load_config(blocks / "bare.yaml").loss) == {"name": "combo"}


def test_block_renamed_on_the_command_line_drops_the_old_params(blocks):
    cfg = load_config(blocks / "base.yaml", ["scheduler.name=cosine", "loss.name=combo"])
    assert OmegaConf.to_container(cfg.scheduler) == {"name": "cosine"}
    assert OmegaConf.to_container(cfg.loss) == {"name": "combo"}
    same = load_config(blocks / "base.yaml", ["scheduler.name=plateau"])  # not a rename: params stay
    assert same.scheduler.params.patience == 3


@pytest.mark.parametrize(
    "overrides",
    [
        ["scheduler.name=cosine", "scheduler.params.warmup_epochs=1.5"],
        ["scheduler.params.warmup_epochs=1.5", "scheduler.name=cosine"],
        ["scheduler={name: cosine, params: {warmup_epochs: 1.5}}"],
        ["scheduler.name=cosine", "scheduler.params={warmup_epochs: 1.5}"],
    ],
)
def test_block_renamed_on_the_command_line_with_params(blocks, overrides):
    cfg = load_config(blocks / "base.yaml", overrides)
    assert OmegaConf.to_container(cfg.scheduler) == {"name": "cosine", "params": {"warmup_epochs": 1.5}}


def test_params_of_a_block_not_renamed_are_still_checked(blocks):
    with pytest.raises(ConfigError, match="no config key 'scheduler.params.warmup_epochs'"):
        load_config(blocks / "base.yaml", ["scheduler.params.warmup_epochs=1"])


@pytest.mark.parametrize(
    "overrides",
    [["scheduler.name=plateau"], ["loss.name=combo"], ["scheduler.name=plateau", "scheduler.params.patience=1"]],
)
def test_shipped_blocks_renamed_on_the_command_line_build(overrides):
    """The issue's case: the tiny config's cosine params once reached the plateau scheduler."""
    import torch

    from conftest import ROOT
    from pneumoseg.modeling.losses import build_loss
    from pneumoseg.modeling.optim import build_optimizer, build_scheduler

    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    optimizer = build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    build_scheduler(cfg.scheduler, optimizer, updates_per_epoch=2, epochs=2)
    build_loss(cfg.loss)


@pytest.mark.parametrize("members", [["self"], ["a", "b"]], ids=["lists itself", "two list each other"])
def test_a_cycle_of_ensembles_is_refused_at_once_naming_it(tmp_path, members):
    files = {name: tmp_path / f"{name}.yaml" for name in ("self", "a", "b")}
    others = {"self": "self", "a": "b", "b": "a"}
    for name, path in files.items():
        member = files[others[name]]
        write(
            path,
            f"experiment: {name}\npaths:\n  experiment_dir: out/{name}\nensemble:\n  members:\n"
            f"    - config: {member}\n    - config: {member}\n",
        )
    started = time.monotonic()
    with pytest.raises(ConfigError, match="ensemble configs form a cycle") as caught:
        load_config(files[members[0]])
    assert time.monotonic() - started < 2
    message = str(caught.value)
    assert len(message) < 1000 and all(str(files[name]) in message for name in members)


@pytest.mark.parametrize("name", ["../../../outside", "a/b", "..", "x/../..", "/abs", "a\\b", ""])
def test_an_experiment_name_must_be_a_plain_name(chain, name):
    with pytest.raises(ConfigError, match="not a plain name"):
        load_config(chain, [f"experiment={name}"] if name else ["experiment=''"])


def test_plain_experiment_names_pass(chain):
    assert load_config(chain, ["experiment=siim_unet-r34.v2"]).experiment == "siim_unet-r34.v2"


def test_a_typo_in_an_experiment_file_names_the_file_the_key_and_the_nearest_key(chain, tmp_path):
    typo = write(tmp_path / "typo.yaml", "base: mid.yaml\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown key train.epoch \(did you mean train.epochs"):
        load_config(typo)
    section = write(tmp_path / "section.yaml", "base: mid.yaml\ntrian: {epochs: 3}\n")
    with pytest.raises(ConfigError, match="unknown key trian .did you mean train"):
        load_config(section)


def test_plus_adds_a_key_in_a_file_and_free_form_subtrees_are_not_checked(tmp_path):
    write(
        tmp_path / "base.yaml",
        "train: {epochs: 1, ema: null, steps: [1, 2]}\nscheduler: {name: plateau, params: {patience: 3}}\n",
    )
    top = write(
        tmp_path / "top.yaml",
        "base: base.yaml\n+demo: {n_train: 5}\ntrain:\n  +extra: 2\n"
        "  ema: {decay: 0.9}\n  steps: [{any: 1}]\nscheduler: {params: {min_lr: 0.1}}\n",
    )
    cfg = load_config(top)
    assert cfg.demo.n_train == 5 and cfg.train.extra == 2 and cfg.train.ema.decay == 0.9
    assert cfg.scheduler.params.min_lr == 0.1 and "+demo" not in cfg


def test_an_override_typo_suggests_the_nearest_key(chain):
    with pytest.raises(ConfigError, match=r"no config key 'train.epoch' \(did you mean train.epochs"):
        load_config(chain, ["train.epoch=3"])


@pytest.mark.parametrize(
    "name",
    sorted(
        str(path.relative_to(Path(__file__).resolve().parents[1] / "configs"))
        for path in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")
    ),
)
def test_every_shipped_config_loads(name):
    from conftest import ROOT

    load_config(ROOT / "configs" / name)


def test_an_unresolvable_interpolation_is_one_plain_line(tmp_path):
    bad = write(tmp_path / "bad.yaml", "train: {epochs: 1}\nname: ${nowhere.key}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    message = str(caught.value)
    assert message.startswith(f"config {bad}: ") and "nowhere.key" in message
    assert "\n" not in message and "object_type" not in message and "full_key" not in message
