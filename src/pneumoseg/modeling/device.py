"""Where a model runs and in which precision: one rule for training, prediction and serving."""

from __future__ import annotations

import contextlib
import os

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


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's or ``taskset``'s limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cpu_threads(setting, key: str, reserved: int = 0, sharers: int = 1) -> int | None:
    """The intra-op thread count that ``setting`` asks for: one rule for training, prediction and serving.

    ``auto`` is the cores this process may use less ``reserved`` (its DataLoader worker processes, each busy on a
    core of its own), shared among ``sharers`` threads that run models at once (the server's predictions), at least
    1; torch's own default, one thread per core, oversubscribes a CPU that loader workers share, and its threads then
    wait for each other's time slices at every operation (3-6x slower epochs on a 2-core machine, README).

    Args:
        setting: ``auto``, a count of at least 1, or None (torch's default, left as it is).
        key: the setting's config key or option, for the message.
        reserved: cores kept for other processes of this job (loader workers).
        sharers: threads running models at once in this process.

    Returns:
        The count, or None for torch's default.

    Raises:
        ConfigError: a setting that is neither ``auto``, None nor a whole number of at least 1.
    """
    if setting is None:
        return None
    if str(setting) == "auto":
        return max(1, (usable_cores() - max(0, int(reserved))) // max(1, int(sharers)))
    if isinstance(setting, bool) or not str(setting).isdigit() or int(setting) < 1:
        raise ConfigError(f"{key} must be auto, a whole number of at least 1, or null; got {setting}")
    return int(setting)


def set_cpu_threads(setting, key: str, reserved: int = 0, sharers: int = 1) -> int:
    """Set torch's intra-op threads of this process by :func:`cpu_threads` and return the count in force.

    Args:
        setting: ``auto``, a count of at least 1, or None (torch's default, left as it is).
        key: the setting's config key or option, for the message.
        reserved: cores kept for other processes of this job (loader workers).
        sharers: threads running models at once in this process.

    Raises:
        ConfigError: a bad setting (see :func:`cpu_threads`).
    """
    threads = cpu_threads(setting, key, reserved, sharers)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
