"""Where a model runs and in which precision: one rule for training, prediction and serving."""
from __future__ import annotations

import contextlib

import torch

from pneumoseg.errors import ConfigError


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """``auto`` (a GPU when there is one, else the CPU), ``cpu`` or ``cuda`` -> this process's device.

    Raises:
        ConfigError: ``cuda`` was asked for but there is no GPU, or the setting is unknown.
    """
    if setting not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, not {setting!r}")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but PyTorch sees no GPU; set train.device=auto or cpu")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def autocast(device: torch.device, amp: str | None):
    """The autocast context of ``amp`` (``fp16``, ``bf16``, ``auto`` = bf16 where supported, else fp16, or None)
    on a GPU; a no-op on the CPU, where training and prediction run in fp32."""
    if device.type != "cuda" or amp is None:
        return contextlib.nullcontext()
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return torch.autocast("cuda", dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[amp])
