"""Segmentation models from a config block, through segmentation-models-pytorch (smp).

A ``model`` block names an smp architecture and its parameters::

    model:
      name: Unet                    # any smp architecture: Unet, UnetPlusPlus, FPN, DeepLabV3Plus, ...
      params:
        encoder_name: resnet34      # an smp encoder, or "tu-<timm model>" for any timm backbone
        encoder_weights: imagenet   # imagenet | null (random) | a path to a local torchvision/timm state dict
        in_channels: 1              # 1 (grey) or 3 (grey repeated)
        classes: 1
      normalize: {mean: 0.449, std: 0.226}   # applied to images scaled to [0, 1] (see pneumoseg.data.dataset)

The image-level gate: ``params.aux_params: {classes: 1, dropout: 0.2}`` adds smp's classification head on the
encoder's deepest features, trained on "has pneumothorax" (``loss.gate_weight``, see
:mod:`pneumoseg.modeling.losses`). Such a network returns ``(mask logits, gate logits)``; :func:`split_output` is
the one place that unpacks either form, so every caller works with and without the head.

``encoder_weights: imagenet`` downloads the weights from the Hugging Face Hub on first use (cached afterwards).
Offline that fails at once with a ConfigError telling how to give a local file instead: the encoder's state dict
as torchvision or timm publish it (``resnet34-b627a593.pth``, ``pytorch_model.bin``, ``model.safetensors``).
With ``in_channels: 1`` the pretrained first convolution is summed over its three colour channels, which is what
a grey image repeated three times would see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import segmentation_models_pytorch as smp
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pneumoseg.errors import ConfigError
from pneumoseg.registry import Registry

MODELS: Registry[nn.Module] = Registry("model architecture")
for _architecture in smp.MODEL_ARCHITECTURES_MAPPING.values():
    MODELS.add(_architecture.__name__, _architecture)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
TIMM_PREFIX = "tu-"


def _download_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the pretrained weights could not be fetched" (offline, no cache, no access)."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:  # older huggingface_hub: its errors derive from OSError (requests) anyway
        pass
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(errors)


def _as_dict(block: Mapping[str, Any] | DictConfig | None) -> dict:
    if isinstance(block, DictConfig):
        return cast(dict, OmegaConf.to_container(block, resolve=True))
    return dict(block or {})


def split_output(output: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(mask logits B x 1 x H x W, gate logits B or None)`` of a network's output, with or without the gate
    head (smp returns ``(masks, labels)`` when built with ``aux_params``)."""
    if isinstance(output, torch.Tensor):
        return output, None
    masks, labels = output
    return masks, labels[:, 0]


def has_gate(net: nn.Module) -> bool:
    """Whether a network built by :func:`build_model` has the image-level gate head."""
    return getattr(net, "classification_head", None) is not None


def _check_gate(params: Mapping[str, Any]) -> None:
    """Refuse an ``aux_params`` head other than one logit (the gate's probability is its sigmoid)."""
    aux = params.get("aux_params")
    if aux is None:
        return
    if not isinstance(aux, Mapping) or int(aux.get("classes", 1)) != 1 or aux.get("activation") is not None:
        raise ConfigError(
            f"model.params.aux_params={aux!r}: the gate head must give one logit: "
            f"{{classes: 1, dropout: ...}}, without an activation"
        )


def local_weights_path(weights: Any) -> Path | None:
    """The file named by ``encoder_weights`` when it is a path (it exists, has a folder or a weights suffix).

    Raises:
        ConfigError: it looks like a path but no such file exists.
    """
    if not isinstance(weights, (str, Path)):
        return None
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if path.suffix in WEIGHT_SUFFIXES or len(path.parts) > 1:
        raise ConfigError(f"model.params.encoder_weights: file not found: {path}")
    return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # Training checkpoints often wrap the weights; accept the usual wrappers.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = cast(dict, state[key])
    return state


def build_model(block: Mapping[str, Any] | DictConfig, pretrained: bool = True) -> nn.Module:
    """Build the model of a ``model`` config block (see the module docstring).

    Args:
        block: ``{name, params}``; other keys (``normalize``) are ignored here.
        pretrained: False ignores ``encoder_weights`` (random init), for models whose weights are loaded from a
            checkpoint right after.

    Raises:
        ConfigError: unknown architecture or encoder, bad parameters (a gate head of more than one logit), a missing
            or mismatched weights file, or ``imagenet`` weights that cannot be downloaded (with how to give a local
            file instead).
    """
    block = _as_dict(block)
    params = dict(block.get("params") or {})
    _check_gate(params)
    encoder = str(params.get("encoder_name", "resnet34"))
    weights = params.pop("encoder_weights", None)
    if not pretrained:
        weights = None
    local = local_weights_path(weights)
    timm_encoder = encoder.startswith(TIMM_PREFIX)
    if local is not None and timm_encoder:
        # timm loads a local file itself (adapting the first convolution to in_chans) when told where it is.
        params.update(encoder_weights=True, pretrained_cfg_overlay={"file": str(local)})
    elif local is not None:
        return _build_with_local_encoder(block, params, local)
    elif weights is not None:
        # tu- encoders take True/None; their pretrained variant is part of the encoder name (tu-model.tag).
        params["encoder_weights"] = True if timm_encoder else weights
    else:
        params["encoder_weights"] = None
    return _build(block, params, weights)


def _build(block: dict, params: dict, weights: Any) -> nn.Module:
    name = block.get("name")
    try:
        return MODELS.build({"name": name, "params": params})
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"model {name} with {params}: {exc}") from None
    except _download_errors() as exc:
        raise ConfigError(
            f"model.params.encoder_weights={weights!r}: could not download the pretrained weights of encoder "
            f"{params.get('encoder_name')!r} ({type(exc).__name__}: {str(exc)[:200]}). Offline, fetch the encoder's "
            f"torchvision or timm state dict on a connected machine (e.g. torchvision's resnet34-b627a593.pth, or "
            f"timm's model.safetensors), copy it here and set model.params.encoder_weights=/path/to/that/file; or "
            f"copy a Hugging Face cache that holds it into ~/.cache/huggingface; or set "
            f"model.params.encoder_weights=null to train from scratch."
        ) from None


def _build_with_local_encoder(block: dict, params: dict, path: Path) -> nn.Module:
    """An smp (non-timm) encoder with weights from a local file: build for 3 channels, load, then adapt."""
    in_channels = int(params.get("in_channels", 3))
    model = _build(block, {**params, "encoder_weights": None, "in_channels": 3}, str(path))
    state = _read_state_dict(path)
    encoder: Any = model.encoder  # an smp encoder: an nn.Module with set_in_channels
    try:
        # smp's encoders drop the classifier keys (fc.*) of a torchvision state dict themselves.
        encoder.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(
            f"model.params.encoder_weights: {path} does not fit encoder {params.get('encoder_name')!r}: "
            f"{str(exc)[:300]}. Give the torchvision/timm state dict of exactly this encoder."
        ) from None
    encoder.set_in_channels(in_channels, pretrained=True)
    return model
