import math

import pytest
import torch
import torch.nn.functional as F

from pneumoseg.errors import ConfigError
from pneumoseg.modeling.losses import LOSSES, build_loss, focal_loss, mixed_loss, soft_dice_score


def _pair(seed=0, empty=False):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 1, 8, 8, generator=generator)
    target = torch.zeros(3, 1, 8, 8) if empty else (torch.rand(3, 1, 8, 8, generator=generator) > 0.7).float()
    return logits, target


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_has_a_gradient_on_an_all_empty_batch(name):
    logits, target = _pair(empty=True)
    logits.requires_grad_(True)
    loss = build_loss({"name": name})(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad.abs().sum() > 0
    # On empty masks every pixel should be pushed towards background: the gradient on the logits is positive.
    assert (logits.grad >= 0).all()


def test_soft_dice_by_hand():
    # p = sigmoid(0) = 0.5 everywhere, 4 pixels, 2 of them positive: (2 * 1 + 1) / (2 + 2 + 1) = 0.6
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert soft_dice_score(logits, target, smooth=1.0).item() == pytest.approx(0.6)
    assert soft_dice_score(logits, target, smooth=1.0, per_image=True).item() == pytest.approx(0.6)


def test_per_image_dice_averages_images():
    logits = torch.full((2, 1, 1, 2), 50.0)  # p ~ 1 everywhere
    target = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 0.0]]]])
    # image 1: (2*2 + 1) / (2 + 2 + 1) = 1; image 2: 1 / (2 + 0 + 1) = 1/3; batch: (4 + 1) / (4 + 2 + 1) = 5/7
    assert soft_dice_score(logits, target, per_image=True).item() == pytest.approx((1 + 1 / 3) / 2, rel=1e-4)
    assert soft_dice_score(logits, target).item() == pytest.approx(5 / 7, rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_focal_with_gamma_zero_is_bce(seed):
    logits, target = _pair(seed)
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, target).item(), rel=1e-6
    )


@pytest.mark.parametrize("logit, target, gamma", [(2.0, 1.0, 2.0), (2.0, 0.0, 2.0), (-1.0, 0.0, 1.0), (0.0, 1.0, 3.0)])
def test_focal_single_pixel_by_hand(logit, target, gamma):
    p = 1 / (1 + math.exp(-logit))
    p_t = p if target else 1 - p
    expected = -((1 - p_t) ** gamma) * math.log(p_t)
    value = focal_loss(torch.tensor([[[[logit]]]]), torch.tensor([[[[target]]]]), gamma)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_focal_is_stable_for_large_logits():
    logits = torch.tensor([[[[80.0, -80.0]]]], requires_grad=True)
    loss = focal_loss(logits, torch.tensor([[[[0.0, 1.0]]]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


# Two pixels worked out by hand: logits (0, ln 3), so p = (1/2, 3/4); target (1, 0).
#   BCE:   pixel 1: -ln(1/2) = ln 2; pixel 2: -ln(1 - 3/4) = 2 ln 2; mean 1.5 ln 2.
#   focal, gamma 2: pixel 1: (1 - 1/2)^2 ln 2 = ln 2 / 4; pixel 2: p_t = 1/4, (3/4)^2 * 2 ln 2 = 9/8 ln 2;
#          mean (1/4 + 9/8) / 2 ln 2 = 11/16 ln 2.
#   soft dice, smooth 1: (2 * (1/2 * 1 + 3/4 * 0) + 1) / ((1/2 + 3/4) + 1 + 1) = 2 / (13/4) = 8/13.
#   BCE with pos_weight 2: (2 * ln 2 + 2 ln 2) / 2 = 2 ln 2.
TWO_LOGITS = torch.tensor([[[[0.0, math.log(3.0)]]]])
TWO_TARGETS = torch.tensor([[[[1.0, 0.0]]]])
LN2 = math.log(2.0)


def test_mixed_loss_by_hand():
    # 10 * 11/16 ln 2 - ln(8/13) = 6.875 ln 2 + ln(13/8) = 5.2509...
    expected = 6.875 * LN2 + math.log(13 / 8)
    assert mixed_loss(TWO_LOGITS, TWO_TARGETS, alpha=10.0, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)
    assert build_loss({"name": "mixed", "params": {"alpha": 10, "gamma": 2}})(
        TWO_LOGITS, TWO_TARGETS
    ).item() == pytest.approx(expected, rel=1e-6)
    # alpha 1, gamma 0: 1.5 ln 2 + ln(13/8)
    assert mixed_loss(TWO_LOGITS, TWO_TARGETS, alpha=1.0, gamma=0.0).item() == pytest.approx(
        1.5 * LN2 + math.log(13 / 8), rel=1e-6
    )


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"bce": 1, "dice": 0, "focal": 0}, 1.5 * LN2),
        ({"bce": 0, "dice": 2, "focal": 0}, 2 * (1 - 8 / 13)),  # 10/13
        ({"bce": 0.5, "dice": 1, "focal": 3}, 0.75 * LN2 + 5 / 13 + 3 * 11 / 16 * LN2),
        ({"bce": 1, "dice": 0, "focal": 0, "pos_weight": 2.0}, 2 * LN2),
    ],
)
def test_combo_loss_by_hand(params, expected):
    value = build_loss({"name": "combo", "params": params})(TWO_LOGITS, TWO_TARGETS)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_single_terms_by_hand():
    assert build_loss({"name": "bce"})(TWO_LOGITS, TWO_TARGETS).item() == pytest.approx(1.5 * LN2, rel=1e-6)
    assert build_loss({"name": "focal"})(TWO_LOGITS, TWO_TARGETS).item() == pytest.approx(11 / 16 * LN2, rel=1e-6)
    assert build_loss({"name": "dice"})(TWO_LOGITS, TWO_TARGETS).item() == pytest.approx(5 / 13, rel=1e-6)
    assert build_loss({"name": "log_dice"})(TWO_LOGITS, TWO_TARGETS).item() == pytest.approx(math.log(13 / 8), rel=1e-6)


def test_perfect_prediction_has_a_small_loss():
    target = _pair(5)[1]
    logits = (target * 2 - 1) * 30
    assert build_loss({"name": "mixed"})(logits, target).item() < 1e-3


def test_bad_loss_params_fail_when_built():
    with pytest.raises(ConfigError, match="mixed"):
        build_loss({"name": "mixed", "params": {"alpah": 10}})
    with pytest.raises(ConfigError, match="unknown loss"):
        build_loss({"name": "dice_bce"})


# Four pixels, logits (2, -1, 0.5, -3), truth (1, 0, 0, 1). Hinge errors 1 - logit * sign: (-1, 0, 1.5, 4); sorted
# descending (4, 1.5, 0, -1) with truth (1, 0, 0, 1): the Jaccard's steps 1 - (1/2, 1/3, 1/4, 0) give the weights
# (1/2, 1/6, 1/12, 1/4), so the hinge is 4/2 + 1.5/6 = 2.25. Flipped (-logits, 1 - truth): the same errors with
# truth (0, 1, 1, 0), weights (1/3, 1/3, 1/3, 0): 4/3 + 1.5/3 = 11/6; symmetric: (2.25 + 11/6) / 2 = 49/24.
LOVASZ_LOGITS = torch.tensor([2.0, -1.0, 0.5, -3.0]).reshape(1, 1, 2, 2)
LOVASZ_TARGETS = torch.tensor([1.0, 0.0, 0.0, 1.0]).reshape(1, 1, 2, 2)


@pytest.mark.parametrize(
    "block, expected",
    [
        ({"name": "lovasz"}, 2.25),
        ({"name": "symmetric_lovasz"}, 49 / 24),
        ({"name": "combo", "params": {"bce": 0, "dice": 0, "lovasz": 2.0}}, 4.5),
        ({"name": "combo", "params": {"bce": 0, "dice": 0, "lovasz": 1.0, "symmetric_lovasz": 1.0}}, 2.25 + 49 / 24),
    ],
)
def test_lovasz_by_hand(block, expected):
    assert build_loss(block)(LOVASZ_LOGITS, LOVASZ_TARGETS).item() == pytest.approx(expected, rel=1e-6)


def test_lovasz_per_image_averages_images_and_the_batch_form_pools_them():
    # image 2: logits (0, 0, 0, 0), truth (1, 1, 0, 0): errors all 1, any order; sorted truth as torch sorts ties
    logits = torch.cat([LOVASZ_LOGITS, torch.zeros(1, 1, 2, 2)])
    target = torch.cat([LOVASZ_TARGETS, torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 2)])
    # every error 1 with 2 positives of 4: the weights sum to the full Jaccard loss of all pixels, 1 - 0 = 1
    per_image = build_loss({"name": "lovasz", "params": {"per_image": True}})(logits, target).item()
    assert per_image == pytest.approx((2.25 + 1.0) / 2, rel=1e-6)
    pooled = build_loss({"name": "lovasz"})(logits, target).item()
    assert pooled != pytest.approx(per_image, rel=1e-3)


def test_lovasz_on_an_empty_image_is_the_largest_hinge_error():
    logits = torch.tensor([0.5, -2.0, 1.5, -0.25]).reshape(1, 1, 2, 2)
    empty = torch.zeros_like(logits)
    assert build_loss({"name": "lovasz"})(logits, empty).item() == pytest.approx(2.5, rel=1e-6)  # 1 + 1.5
    # flipped: every pixel positive, errors 1 + logit, weights 1/4 each
    flipped = (1.5 + 0.0 + 2.5 + 0.75) / 4  # 1 - 2 < 0: that pixel adds nothing
    assert build_loss({"name": "symmetric_lovasz"})(logits, empty).item() == pytest.approx((2.5 + flipped) / 2)
