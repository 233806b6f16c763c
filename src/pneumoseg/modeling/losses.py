"""Segmentation losses on logits: pure functions, thin ``nn.Module`` wrappers, and a registry for configs.

Every loss takes ``logits`` and a ``target`` of the same shape (B x 1 x H x W, target in {0, 1}) and returns a
scalar. The Dice terms are "soft" (on sigmoid probabilities) with additive smoothing in the numerator and the
denominator, so a batch whose masks are all empty still gives a gradient that pushes every probability down.
smp's binary ``DiceLoss`` zeroes such batches instead, which leaves a model trained on mostly empty images with
no Dice signal on most steps.

Config blocks (``loss: {name, params}``):

* ``mixed``: the 2019 kernel's ``alpha * focal - log(soft dice)``, alpha 10, gamma 2.
* ``combo``: ``bce * BCE + dice * (1 - soft dice) + focal * focal + lovasz * Lovász hinge + symmetric_lovasz *
  symmetric Lovász``, weights in params.
* ``bce``, ``dice``, ``log_dice``, ``focal``, ``lovasz``, ``symmetric_lovasz``: a single term.

The Lovász hinge (Berman et al. 2018; the 3rd and 8th places trained with it) is smp's ``LovaszLoss`` in binary
mode: a convex surrogate of the Jaccard loss, the hinge errors ``1 - logit * sign`` sorted and weighted by the
Jaccard's gradient. Its symmetric form averages the loss on ``(logits, target)`` and on ``(-logits, 1 - target)``,
so empty images (whose own Jaccard has no positive pixel to reward) weigh as much as the lesions.

The gate: a network with the image-level head (``model.params.aux_params``) is trained with
``loss.gate_weight * BCE(gate logit, image has a mask)`` added to the block's mask loss (:func:`build_training_loss`),
as the 4th-place solution trained its "empty" branch (3 BCE + 1 Dice + 0.1 BCE(empty)).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pneumoseg.errors import ConfigError
from pneumoseg.modeling.models import split_output
from pneumoseg.registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")


def soft_dice_score(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, per_image: bool = False
) -> torch.Tensor:
    """Soft Dice ``(2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)`` with ``p = sigmoid(logits)``.

    Args:
        logits: raw model outputs, B x ... .
        target: {0, 1} masks of the same shape.
        smooth: added to numerator and denominator; must be > 0 for a gradient on empty masks.
        per_image: False sums over the whole batch (the 2019 kernel); True averages the Dice of each image.

    Returns:
        A scalar in (0, 1].
    """
    probs = torch.sigmoid(logits.float())
    target = target.float()
    dims = tuple(range(1, probs.ndim)) if per_image else tuple(range(probs.ndim))
    intersection = (probs * target).sum(dims)
    total = probs.sum(dims) + target.sum(dims)
    return ((2.0 * intersection + smooth) / (total + smooth)).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss ``(1 - p_t) ** gamma * BCE``, averaged over every pixel; ``gamma = 0`` is plain BCE."""
    logits, target = logits.float(), target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    # log(1 - p_t) = logsigmoid(-z) for z = logit * (+1 for a positive pixel, -1 for a negative one): stable for
    # large logits, unlike computing 1 - exp(-bce).
    log_one_minus_pt = F.logsigmoid(-logits * (2.0 * target - 1.0))
    return (torch.exp(gamma * log_one_minus_pt) * bce).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float | None = None) -> torch.Tensor:
    """Binary cross-entropy on logits, averaged over every pixel; ``pos_weight`` scales the positive pixels."""
    weight = None if pos_weight is None else torch.tensor(pos_weight, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=weight)


def mixed_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 10.0, gamma: float = 2.0, smooth: float = 1.0
) -> torch.Tensor:
    """``alpha * focal - log(soft dice)``: the MixedLoss of the 2019 SIIM UNet-ResNet34 kernel."""
    return alpha * focal_loss(logits, target, gamma) - torch.log(soft_dice_score(logits, target, smooth))


def _lovasz_gradient(sorted_target: torch.Tensor) -> torch.Tensor:
    """The Jaccard loss's gradient along pixels sorted by decreasing error (smp's ``_lovasz_grad``)."""
    positives = sorted_target.sum()
    intersection = positives - sorted_target.cumsum(0)
    union = positives + (1.0 - sorted_target).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def _lovasz_hinge_flat(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The Lovász hinge of one flat vector of logits and its {0, 1} target."""
    if logits.numel() == 0:
        return logits.sum() * 0.0
    errors = 1.0 - logits * (2.0 * target - 1.0)
    sorted_errors, order = torch.sort(errors, descending=True)
    return torch.dot(F.relu(sorted_errors), _lovasz_gradient(target[order]))


def lovasz_hinge(logits: torch.Tensor, target: torch.Tensor, per_image: bool = False) -> torch.Tensor:
    """Binary Lovász hinge on logits, as smp's ``LovaszLoss(mode="binary")``.

    Args:
        logits: raw model outputs, B x ... .
        target: {0, 1} masks of the same shape.
        per_image: False: one loss over every pixel of the batch (smp's default); True: the mean of each image's.
    """
    logits, target = logits.float(), target.float()
    if per_image:
        return torch.stack([_lovasz_hinge_flat(z.reshape(-1), t.reshape(-1)) for z, t in zip(logits, target)]).mean()
    return _lovasz_hinge_flat(logits.reshape(-1), target.reshape(-1))


def symmetric_lovasz(logits: torch.Tensor, target: torch.Tensor, per_image: bool = False) -> torch.Tensor:
    """``(lovasz_hinge(logits, target) + lovasz_hinge(-logits, 1 - target)) / 2`` (``per_image`` as there)."""
    target = target.float()
    return 0.5 * (lovasz_hinge(logits, target, per_image) + lovasz_hinge(-logits, 1.0 - target, per_image))


class _FunctionalLoss(nn.Module):
    """A module around one of the functions above with its keyword parameters fixed."""

    function: Callable[..., torch.Tensor] = staticmethod(bce_loss)

    def __init__(self, **params) -> None:
        super().__init__()
        # Bind now so that a misspelt parameter fails when the config is read, not at the first batch.
        inspect.signature(self.function).bind(None, None, **params)
        self.params = params

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.function(logits, target, **self.params)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.params.items())


@LOSSES.register("mixed")
class MixedLoss(_FunctionalLoss):
    """``alpha * focal - log(soft dice)`` (params: alpha 10, gamma 2, smooth 1)."""

    function = staticmethod(mixed_loss)


@LOSSES.register("combo")
class ComboLoss(nn.Module):
    """``bce * BCE + dice * (1 - soft dice) + focal * focal + lovasz * Lovász hinge + symmetric_lovasz * symmetric
    Lovász``; a term with weight 0 is not computed.

    Args:
        bce, dice, focal, lovasz, symmetric_lovasz: the weights of the terms.
        gamma: the focal term's focusing parameter.
        smooth: the soft dice's smoothing.
        pos_weight: the BCE term's weight of positive pixels; None: 1.
        lovasz_per_image: the Lovász terms per image (True) or over the whole batch (False, smp's default).
    """

    def __init__(
        self,
        bce: float = 1.0,
        dice: float = 1.0,
        focal: float = 0.0,
        gamma: float = 2.0,
        smooth: float = 1.0,
        pos_weight: float | None = None,
        lovasz: float = 0.0,
        symmetric_lovasz: float = 0.0,
        lovasz_per_image: bool = False,
    ) -> None:
        super().__init__()
        self.bce, self.dice, self.focal = bce, dice, focal
        self.gamma, self.smooth, self.pos_weight = gamma, smooth, pos_weight
        self.lovasz, self.symmetric_lovasz, self.lovasz_per_image = lovasz, symmetric_lovasz, lovasz_per_image

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros((), dtype=torch.float32)
        if self.bce:
            total = total + self.bce * bce_loss(logits, target, self.pos_weight)
        if self.dice:
            total = total + self.dice * (1.0 - soft_dice_score(logits, target, self.smooth))
        if self.focal:
            total = total + self.focal * focal_loss(logits, target, self.gamma)
        if self.lovasz:
            total = total + self.lovasz * lovasz_hinge(logits, target, self.lovasz_per_image)
        if self.symmetric_lovasz:
            total = total + self.symmetric_lovasz * symmetric_lovasz(logits, target, self.lovasz_per_image)
        return total

    def extra_repr(self) -> str:
        return (
            f"bce={self.bce}, dice={self.dice}, focal={self.focal}, gamma={self.gamma}, smooth={self.smooth}, "
            f"pos_weight={self.pos_weight}, lovasz={self.lovasz}, symmetric_lovasz={self.symmetric_lovasz}, "
            f"lovasz_per_image={self.lovasz_per_image}"
        )


@LOSSES.register("bce")
class BCELoss(_FunctionalLoss):
    """Binary cross-entropy on logits (param: pos_weight)."""

    function = staticmethod(bce_loss)


@LOSSES.register("focal")
class FocalLoss(_FunctionalLoss):
    """Binary focal loss (param: gamma)."""

    function = staticmethod(focal_loss)


@LOSSES.register("lovasz")
class LovaszLoss(_FunctionalLoss):
    """Binary Lovász hinge, smp's ``LovaszLoss`` (param: per_image, False by default as there)."""

    function = staticmethod(lovasz_hinge)


@LOSSES.register("symmetric_lovasz")
class SymmetricLovaszLoss(_FunctionalLoss):
    """The Lovász hinge averaged over ``(logits, target)`` and ``(-logits, 1 - target)`` (param: per_image)."""

    function = staticmethod(symmetric_lovasz)


@LOSSES.register("dice")
class DiceLoss(_FunctionalLoss):
    """``1 - soft dice`` (params: smooth, per_image)."""

    @staticmethod
    def function(logits, target, smooth=1.0, per_image=False):
        return 1.0 - soft_dice_score(logits, target, smooth, per_image)


@LOSSES.register("log_dice")
class LogDiceLoss(_FunctionalLoss):
    """``-log(soft dice)`` (params: smooth, per_image)."""

    @staticmethod
    def function(logits, target, smooth=1.0, per_image=False):
        return -torch.log(soft_dice_score(logits, target, smooth, per_image))


def build_loss(block) -> nn.Module:
    """The loss module of a ``{name, params}`` config block; see the module docstring for the names."""
    return LOSSES.build(block)


class GatedLoss(nn.Module):
    """``mask_loss(mask logits, masks) + gate_weight * BCE(gate logit, image has a mask)`` on a network's raw
    output (with or without the gate head; without it, the mask loss alone).

    Args:
        mask_loss: the loss of the mask logits.
        gate_weight: the weight of the gate's binary cross-entropy (mean over the batch's images).
    """

    def __init__(self, mask_loss: nn.Module, gate_weight: float) -> None:
        super().__init__()
        self.mask_loss = mask_loss
        self.gate_weight = float(gate_weight)

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        logits, gate = split_output(output)
        loss = self.mask_loss(logits, target)
        if gate is None:
            return loss
        has_mask = target.flatten(1).amax(1).float()
        return loss + self.gate_weight * F.binary_cross_entropy_with_logits(gate.float(), has_mask)


def build_training_loss(block, gated: bool) -> GatedLoss:
    """The training loss of a ``loss`` section: its ``{name, params}`` mask loss plus, for a network with the gate
    head (``gated``), ``gate_weight`` times the gate's BCE.

    Raises:
        ConfigError: a gated network without a positive ``loss.gate_weight`` (its head would not learn), or a
            ``gate_weight`` for a network without the head.
    """
    weight = block.get("gate_weight")
    if gated and not (weight is not None and float(weight) > 0):
        raise ConfigError(
            f"the model has a gate head (model.params.aux_params) but loss.gate_weight is {weight}; "
            f"give it a positive weight (e.g. loss.gate_weight=0.1), or drop the head"
        )
    if not gated and weight:
        raise ConfigError(
            f"loss.gate_weight={weight} needs a gate head: set model.params.aux_params "
            f"(e.g. {{classes: 1, dropout: 0.2}}), or loss.gate_weight=null"
        )
    return GatedLoss(build_loss(block), float(weight or 0.0))
