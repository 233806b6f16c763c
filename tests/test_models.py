import numpy as np
import pytest
import timm
import torch
import torchvision

from pneumoseg.errors import ConfigError, DataError
from pneumoseg.inference.fold_models import FoldModel, load_fold_models, load_model
from pneumoseg.inference.tta import TTA, predict_probs
from pneumoseg.modeling.models import MODELS, build_model
from pneumoseg.modeling.normalize import Normalize

TINY = {"encoder_name": "tu-resnet10t", "encoder_depth": 3, "decoder_channels": [16, 8, 4], "in_channels": 1}


def _block(name="Unet", **params):
    return {"name": name, "params": {**TINY, "encoder_weights": None, **params}}


@pytest.mark.parametrize("name, drop", [("Unet", ()), ("UnetPlusPlus", ()), ("Linknet", ("decoder_channels",))])
def test_architectures_build_by_name(name, drop):
    params = {k: v for k, v in _block()["params"].items() if k not in drop}
    net = build_model({"name": name, "params": params}).eval()
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 32, 32)


def test_registry_lists_the_smp_architectures():
    assert {"Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus", "Linknet", "MAnet", "PAN", "PSPNet"} <= set(MODELS.names())


def test_offline_imagenet_fails_fast_with_how_to_give_a_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as info:
        build_model(_block(encoder_weights="imagenet"))
    message = str(info.value)
    assert "encoder_weights=/path/to/" in message and "null" in message


@pytest.mark.parametrize("in_channels", [1, 3])
def test_local_torchvision_state_dict_for_an_smp_encoder(tmp_path, in_channels):
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    path = tmp_path / "resnet18-local.pth"
    torch.save(state, path)
    net = build_model(
        {
            "name": "Unet",
            "params": {
                "encoder_name": "resnet18",
                "encoder_depth": 3,
                "decoder_channels": [16, 8, 4],
                "encoder_weights": str(path),
                "in_channels": in_channels,
            },
        }
    )
    conv = net.encoder.conv1.weight
    expected = state["conv1.weight"].sum(1, keepdim=True) if in_channels == 1 else state["conv1.weight"]
    assert torch.equal(conv, expected)
    assert torch.equal(net.encoder.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_local_timm_state_dict_for_a_timm_encoder(tmp_path):
    torch.manual_seed(0)
    state = timm.create_model("resnet10t").state_dict()
    path = tmp_path / "resnet10t.pth"
    torch.save(state, path)
    net = build_model(_block(encoder_weights=str(path)))
    first = net.encoder.model.conv1[0].weight
    assert torch.allclose(first, state["conv1.0.weight"].sum(1, keepdim=True))


def test_weights_file_that_does_not_fit_or_does_not_exist(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"something.weight": torch.zeros(3)}, path)
    with pytest.raises(ConfigError, match="does not fit"):
        build_model({"name": "Unet", "params": {"encoder_name": "resnet18", "encoder_weights": str(path)}})
    with pytest.raises(ConfigError, match="file not found"):
        build_model(_block(encoder_weights=str(tmp_path / "missing.pth")))


def test_unknown_architecture_or_encoder_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown model architecture"):
        build_model({"name": "Unet3D", "params": {}})
    with pytest.raises(ConfigError):
        build_model(_block(encoder_name="resnet_does_not_exist"))


# --- inference ---------------------------------------------------------------------------------------------------


class _Ramp(torch.nn.Module):
    """A 'network' whose logit is the column index minus the mean: not flip-invariant, so TTA is visible."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        cols = torch.arange(x.shape[-1], dtype=torch.float32) - (x.shape[-1] - 1) / 2
        return cols.expand_as(x[:, :1]) + x[:, :1] * 0 + self.anchor


def _fold_model(net):
    return FoldModel(net=net.eval(), normalize=Normalize(0.5, 0.25, 1), image_size=32)


def test_hflip_tta_averages_the_flipped_view_back_in_place():
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    plain = predict_probs([_fold_model(_Ramp())], images, TTA(hflip=False))
    flipped = predict_probs([_fold_model(_Ramp())], images, TTA(hflip=True))
    assert plain[0, 0, -1] > 0.99 and plain[0, 0, 0] < 0.01
    # The flipped view sees the ramp reversed; mapped back and averaged with the plain view, it cancels to 0.5.
    np.testing.assert_allclose(flipped, 0.5, atol=1e-6)


class _Coordinates(torch.nn.Module):
    """A 'network' whose logit is ``3 u + 2 v`` at each pixel, u and v its column and row centre mapped onto
    [-1, 1]: every flip and every transposition of the output shows, and a bilinear resize (half-pixel centres)
    of it is exact away from the border, so a scaled view mapped back must give the unscaled map there."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.sizes = []

    def forward(self, x):
        height, width = x.shape[-2:]
        self.sizes.append((height, width))
        return (3 * _centres(width)[None, :] + 2 * _centres(height)[:, None] + self.anchor).expand_as(x[:, :1])


def _centres(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_flipped_views_are_flipped_back_before_averaging():
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32), dtype=np.uint8)
    u, v = _centres(32).numpy()[None, :], _centres(32).numpy()[:, None]
    # The network sees the flipped image but answers by position; flipped back, the horizontal view's map is
    # 3 (-u) + 2 v and the vertical view's 3 u + 2 (-v). A mirrored, unflipped or wrongly flipped view differs.
    expected = (_sigmoid(3 * u + 2 * v) + _sigmoid(-3 * u + 2 * v) + _sigmoid(3 * u - 2 * v)) / 3
    probs = predict_probs([_fold_model(_Coordinates())], images, TTA(hflip=True, vflip=True))
    np.testing.assert_allclose(probs, np.broadcast_to(expected, probs.shape), atol=1e-6)
    only_vflip = predict_probs([_fold_model(_Coordinates())], images, TTA(hflip=False, vflip=True))
    np.testing.assert_allclose(only_vflip[0], (_sigmoid(3 * u + 2 * v) + _sigmoid(3 * u - 2 * v)) / 2, atol=1e-6)


class _Identity(torch.nn.Module):
    """A 'network' whose logit is its (normalised) input: every view flipped back must give the plain image's map,
    which catches a view that is never flipped (the map then comes back mirrored), where the coordinate network,
    answering by position alone, cannot."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x[:, :1] + self.anchor


def test_every_flipped_view_maps_back_onto_the_image_it_was_made_from():
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32), dtype=np.uint8)
    model = _fold_model(_Identity())
    expected = torch.sigmoid(model.normalize(images)[:, 0]).numpy()
    probs = predict_probs([model], images, TTA(hflip=True, vflip=True))
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert not np.allclose(expected, expected[:, :, ::-1], atol=1e-2)  # the images are not symmetric


def test_scaled_views_are_resized_back_onto_the_same_pixels():
    images = np.random.default_rng(0).integers(0, 255, (2, 64, 64), dtype=np.uint8)
    net = _Coordinates()
    plain = predict_probs([_fold_model(net)], images, TTA(hflip=False))
    net.sizes.clear()
    scaled = predict_probs([_fold_model(net)], images, TTA(hflip=True, scales=(0.5, 1.5)))
    assert sorted(set(net.sizes)) == [(32, 32), (96, 96)]  # the views did run at other sizes
    flipped_plain = predict_probs([_fold_model(net)], images, TTA(hflip=True))
    inner = (slice(None), slice(2, -2), slice(2, -2))  # the border is clamped, not extrapolated
    np.testing.assert_allclose(scaled[inner], flipped_plain[inner], atol=1e-5)
    assert not np.allclose(plain, flipped_plain, atol=1e-2)  # the flip matters, so scale and flip are both seen


def test_predict_probs_matches_the_network_and_scales_keep_the_shape():
    torch.manual_seed(0)
    net = build_model(_block()).eval()
    model = _fold_model(net)
    images = np.random.default_rng(1).integers(0, 255, (5, 32, 32), dtype=np.uint8)
    probs = predict_probs([model], images, None, batch_size=2)
    with torch.no_grad():
        expected = torch.sigmoid(net(model.normalize(images)))[:, 0].numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    scaled = predict_probs([model, model], images[0], TTA(hflip=True, vflip=True, scales=(1.0, 1.5)))
    assert scaled.shape == (32, 32) and scaled.min() >= 0 and scaled.max() <= 1


def test_tta_views():
    assert TTA(hflip=False).views() == [((), 1.0)]
    assert TTA(hflip=True, vflip=True, scales=(1.0, 0.75)).views() == [
        ((), 1.0),
        ((-1,), 1.0),
        ((-2,), 1.0),
        ((), 0.75),
        ((-1,), 0.75),
        ((-2,), 0.75),
    ]
    assert TTA.from_config({"hflip": True, "vflip": False, "scales": [1.0]}) == TTA()


def test_load_model_round_trip_and_missing_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    net = build_model(_block()).eval()
    block = _block(encoder_weights="imagenet")  # as trained: loading must not try to download anything
    fold_dir = tmp_path / "fold0"
    fold_dir.mkdir()
    torch.save(
        {"state_dict": net.state_dict(), "model": block, "image_size": 32, "fold": 0, "epoch": 3, "score": 0.8},
        fold_dir / "best_1.pt",
    )
    loaded = load_fold_models(tmp_path)
    assert len(loaded) == 1 and loaded[0].epoch == 3 and loaded[0].fold == 0
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded[0].net(x), net(x))
    with pytest.raises(DataError, match="fold 1"):
        load_fold_models(tmp_path, folds=[1])
    with pytest.raises(DataError, match="not found"):
        load_model(tmp_path / "nope.pt")
