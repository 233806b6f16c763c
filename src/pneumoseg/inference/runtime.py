"""Which runtime gives the fold models' outputs: torch, or ONNX Runtime on an ONNX export of the same weights.

Everything around the network's forward pass (normalising, the TTA views, the fold ensemble, resizing back,
post-processing) is shared code in :mod:`pneumoseg.inference.tta` and :mod:`pneumoseg.inference.predictor`; the
runtime only decides what computes the logits. An ONNX model is wrapped in :class:`OnnxNet`, which is called like the
torch network (a float32 N x C x H x W tensor in, the mask logits out, with the gate logits as smp gives them when the
model has the gate head), so a :class:`~pneumoseg.inference.tta.FoldModel` holds either::

    export_onnx(model.net, model.image_size, model.normalize.channels, "fold0/best_1.onnx")   # stage 06
    models = with_runtime(models, "onnxruntime", onnx_sources)    # each FoldModel's net an OnnxNet

``predict.runtime`` chooses (:func:`choose_runtime`): ``torch``, ``onnxruntime``, or ``auto``: ONNX Runtime on the
CPU when the package holds ONNX models and onnxruntime imports, torch on a GPU (ONNX Runtime runs here with its CPU
execution provider only). Without ONNX models or without onnxruntime it falls back to torch with one log line.

The export uses torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, opset 17): it exports a
U-Net in about a second where the torch.export-based (dynamo) exporter takes 20 times longer for the same graph and
the same outputs (measured on the demo model: 0.6 s against 12.8 s, logits within 2e-6 of torch's either way).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pneumoseg.errors import ConfigError, DataError
from pneumoseg.evaluation.metrics import dice_per_image
from pneumoseg.inference.fold_models import FoldModel
from pneumoseg.io import atomic_path
from pneumoseg.modeling.models import has_gate
from pneumoseg.stage_table import command

if TYPE_CHECKING:  # the predictor imports this module
    from pneumoseg.inference.predictor import Prediction

log = logging.getLogger(__name__)

TORCH = "torch"
ONNXRUNTIME = "onnxruntime"
AUTO = "auto"
RUNTIMES = (TORCH, ONNXRUNTIME, AUTO)
OPSET = 17
INPUT_NAME = "image"
MASKS_OUTPUT = "masks"
GATE_OUTPUT = "gate"
ONNX_SUFFIX = ".onnx"
# How far ONNX Runtime's predictions may stray from torch's before a package is refused. Reordered fp32 arithmetic
# moves a probability by about 1e-6 on the demo model and up to about 1e-4 on UNet-ResNet34 (logits within 6e-4, and
# the sigmoid's slope is at most 1/4); an export bug (a missing sigmoid, a transposed or shifted map, another fold's
# weights) moves them by 0.1 or more. A mask pixel flips only where its probability lies within that difference of a
# threshold: a few pixels in a million, where 1e-3 of the masks' pixels is a visible change of outline.
MAX_PROBABILITY_DIFFERENCE = 1e-3
MAX_MASK_SHARE_DIFFERING = 1e-3
REBUILD = f"rebuild the package ({command('06')} --force)"


def onnx_available() -> bool:
    """Whether onnxruntime imports here."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def choose_runtime(requested: str, device: torch.device, has_onnx: bool) -> str:
    """The runtime that predicts: ``torch`` or ``onnxruntime``.

    Args:
        requested: ``predict.runtime``: ``torch``, ``onnxruntime`` or ``auto`` (ONNX Runtime on the CPU when
            ``has_onnx`` and onnxruntime imports, else torch).
        device: where the models run; on a GPU ``auto`` means torch.
        has_onnx: whether ONNX models are at hand (a package that holds them, or models to export in memory).

    Returns:
        ``onnxruntime`` only when it can run: asked for (or ``auto`` on the CPU), ONNX models at hand and onnxruntime
        importable; otherwise ``torch``, with one log line saying why when ONNX Runtime was asked for or ``auto``
        would have chosen it.

    Raises:
        ConfigError: an unknown runtime, or ``onnxruntime`` asked for on a GPU.
    """
    if requested not in RUNTIMES:
        raise ConfigError(f"predict.runtime must be one of {', '.join(RUNTIMES)}, not {requested!r}")
    if requested == TORCH or (requested == AUTO and device.type != "cpu"):
        return TORCH
    if device.type != "cpu":
        raise ConfigError(
            f"predict.runtime=onnxruntime runs on the CPU, but the device is {device}; set "
            f"predict.device: cpu, or predict.runtime: auto (torch on a GPU)"
        )
    if not has_onnx:
        log.info(
            "predict.runtime=%s: no ONNX models (a package from before ONNX export, or none built): torch predicts",
            requested,
        )
        return TORCH
    if not onnx_available():
        log.warning(
            "predict.runtime=%s: onnxruntime is not installed (pip install -r requirements.txt): torch predicts",
            requested,
        )
        return TORCH
    return ONNXRUNTIME


def onnx_name(checkpoint_name: str) -> str:
    """The ONNX file's name inside a package beside its checkpoint's: ``fold0/best_1.pt`` -> ``fold0/best_1.onnx``."""
    return Path(checkpoint_name).with_suffix(ONNX_SUFFIX).as_posix()


def export_bytes(net: nn.Module, image_size: int, channels: int) -> bytes:
    """The ONNX model of a network: input ``image`` (float32 N x C x H x W, normalised), outputs ``masks`` (the mask
    logits, N x 1 x H x W) and, for a network with the gate head, ``gate`` (its logit, N x 1); batch, height and width
    are dynamic (TTA scales change the view's size).

    Args:
        net: the torch network (on the CPU, in eval mode).
        image_size: the square size it predicts at (the traced example's).
        channels: its input channels.
    """
    outputs = [MASKS_OUTPUT, GATE_OUTPUT] if has_gate(net) else [MASKS_OUTPUT]
    axes = {0: "batch", 2: "height", 3: "width"}
    example = torch.zeros(2, channels, image_size, image_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The exporter's deprecation notice for the TorchScript path and its tracer's notes on smp's shape checks
        # (true for every size the dynamic axes allow that smp accepts) say nothing about this model.
        warnings.simplefilter("ignore")
        # torch writes to a binary file object too, though its annotation names only paths.
        torch.onnx.export(
            net,
            (example,),
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={INPUT_NAME: axes, MASKS_OUTPUT: axes, GATE_OUTPUT: {0: "batch"}},
        )
    return buffer.getvalue()


def export_onnx(net: nn.Module, image_size: int, channels: int, path: str | os.PathLike) -> None:
    """Write :func:`export_bytes` of ``net`` to ``path`` (atomically)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(export_bytes(net, image_size, channels))


SPIN_VARIABLE = "PNEUMOSEG_ORT_SPIN"
"""Set to 1, ONNX Runtime's threads spin between parallel loops (its own default); otherwise they block."""


def intra_op_threads() -> int:
    """The cores this process may use (its CPU affinity; the machine's count where there is no affinity call).

    ONNX Runtime's own default is the machine's physical cores, which in a container limited to some of them (or
    beside other processes pinned to their own) starts more threads than there are cores for them: each of its
    parallel loops then waits for its slowest, descheduled thread.
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def open_session(source: bytes | Path, name: str, sha256: str | None = None, threads: int | None = None):
    """An ONNX Runtime session (CPU execution provider) of an ONNX model.

    Args:
        source: the model file, or its bytes.
        name: what to call it in errors (its path).
        sha256: the content hash it must have (a package's manifest); checked before ONNX Runtime reads it.
        threads: intra-op threads; default :func:`intra_op_threads`. One inter-op thread: a U-Net is one chain of
            operators, with no independent branches to run beside each other.

    Raises:
        DataError: the file is missing, does not match ``sha256``, or ONNX Runtime cannot load it (its own error).
    """
    import onnxruntime as ort

    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the ONNX model {name}: {exc.strerror}") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(
            f"{name} does not match its sha256 in the package's manifest: the ONNX model is damaged or "
            f"was changed; copy the package again, or {REBUILD}"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or intra_op_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Threads that block rather than spin between parallel loops: the cores are shared with the prediction's other
    # work (decoding, resizing back, post-processing, the predict command's worker processes), which spinning
    # threads would starve. PNEUMOSEG_ORT_SPIN=1 lets them spin (README "torch and ONNX Runtime" compares both).
    spin = os.environ.get(SPIN_VARIABLE, "0") == "1"
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.log_severity_level = 3  # errors only: its notes on graph optimisations are not the user's business
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own classes (Fail, InvalidGraph, ...)
        raise DataError(
            f"ONNX Runtime cannot load {name} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); {REBUILD}"
        ) from None


class OnnxNet(nn.Module):
    """An ONNX Runtime session called like the torch network it was exported from (a module without parameters of
    its own, so that it stands where a :class:`~pneumoseg.inference.tta.FoldModel` holds a network).

    Args:
        session: the session (see :func:`open_session`).
        name: the model file, for errors and logs.

    Raises:
        DataError: the session's inputs and outputs are not an export of :func:`export_bytes` (another model).
    """

    def __init__(self, session, name: str) -> None:
        inputs = [(node.name, len(node.shape)) for node in session.get_inputs()]
        outputs = [node.name for node in session.get_outputs()]
        if inputs != [(INPUT_NAME, 4)] or outputs not in ([MASKS_OUTPUT], [MASKS_OUTPUT, GATE_OUTPUT]):
            raise DataError(
                f"{name} is not a pneumoseg ONNX model (inputs {inputs}, outputs {outputs}; expected one "
                f"4-D {INPUT_NAME!r} and {MASKS_OUTPUT!r}[, {GATE_OUTPUT!r}]); {REBUILD}"
            )
        super().__init__()
        self.session = session
        self.name = name
        # What has_gate() looks for on a torch network: whether the model gives the gate's logit.
        self.classification_head = GATE_OUTPUT if GATE_OUTPUT in outputs else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The logits of a float32 N x C x H x W batch: N x 1 x H x W, with the gate's N x 1 as smp returns them."""
        outputs = self.session.run(None, {INPUT_NAME: x.detach().float().contiguous().numpy()})
        masks = torch.from_numpy(outputs[0])
        return masks if len(outputs) == 1 else (masks, torch.from_numpy(outputs[1]))

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """One CPU tensor: code that asks a torch network for its device (``next(net.parameters()).device``) finds
        the CPU, where ONNX Runtime runs."""
        yield nn.Parameter(torch.empty(0), requires_grad=False)


def runtime_of(models: Sequence[FoldModel]) -> str:
    """``onnxruntime`` when the models' networks are ONNX Runtime sessions, else ``torch``."""
    return ONNXRUNTIME if models and isinstance(models[0].net, OnnxNet) else TORCH


def with_runtime(
    models: Sequence[FoldModel],
    runtime: str,
    sources: Sequence[tuple[bytes | Path, str | None]] | None,
    threads: int | None = None,
) -> list[FoldModel]:
    """The fold models with their networks on ``runtime``.

    Args:
        models: the torch fold models (their normalisation, size and record are kept).
        runtime: ``torch`` (``models`` as they are) or ``onnxruntime``.
        sources: per model, its ONNX model (a file or bytes) and the sha256 it must have (None: unchecked); None
            exports each model in memory (:func:`export_bytes`).
        threads: ONNX Runtime's intra-op threads (default :func:`intra_op_threads`).

    Raises:
        DataError: an ONNX model that is missing, damaged, not loadable or another model's (see :func:`check_net`).
    """
    if runtime == TORCH:
        return list(models)
    if sources is None:
        sources = [(export_bytes(m.net, m.image_size, m.normalize.channels), None) for m in models]
    swapped = []
    for model, (source, sha256) in zip(models, sources, strict=True):
        name = str(source) if isinstance(source, Path) else f"the ONNX export of {model.path}"
        net = OnnxNet(open_session(source, name, sha256, threads), name)
        check_net(net, model)
        swapped.append(dataclasses.replace(model, net=net))
    return swapped


def check_net(net: OnnxNet, model: FoldModel) -> None:
    """Refuse an ONNX model that is not the export of ``model``'s network: its logits of a fixed batch (a gradient,
    both ways) must be those of the torch network within 1e-3 of their largest size (at least 1: fp32 reordering
    gives about 1e-5 of it; another network's weights give differences of order 1), and it must have the gate head
    exactly when the network does.

    Raises:
        DataError: names the file and the difference.
    """
    size = model.image_size
    ramp = torch.linspace(-2, 2, size)
    x = (ramp[None, :] * ramp[:, None].flip(0)).expand(1, model.normalize.channels, size, size).contiguous()
    with torch.inference_mode():
        expected = model.net(x)
    found = net(x)
    expected, found = [out if isinstance(out, tuple) else (out,) for out in (expected, found)]
    if len(expected) != len(found):
        raise DataError(
            f"{net.name} {'has' if len(found) > 1 else 'lacks'} the gate output, unlike the checkpoint "
            f"{model.path} it is packaged with; {REBUILD}"
        )
    worst = max(
        float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("inf")
        for a, b in zip(expected, found)
    )
    # Relative to the logits' size: fp32 rounding grows with it (a network whose logits reach 1e5 differs by 1e-2
    # between runtimes), while another network's weights differ by a share of order 1.
    scale = max([1.0] + [float(a.float().abs().max()) for a in expected])
    if worst > 1e-3 * scale:
        raise DataError(
            f"{net.name} is not the ONNX export of the checkpoint {model.path} it is packaged with (logits "
            f"differ by up to {worst:.3g}, at logits up to {scale:.3g}); {REBUILD}"
        )


@dataclasses.dataclass
class Agreement:
    """How two runtimes' predictions of the same images agree, accumulated batch by batch (:meth:`add`)."""

    images: int = 0
    max_probability_difference: float = 0.0
    differing_pixels: int = 0
    mask_pixels: int = 0
    dice_sum: float = 0.0

    def add(self, expected: Sequence[Prediction], found: Sequence[Prediction]) -> None:
        """Count one batch: the same images predicted by the reference runtime and by the other."""
        for a, b in zip(expected, found, strict=True):
            self.images += 1
            self.max_probability_difference = max(
                self.max_probability_difference, float(np.abs(a.probs - b.probs).max())
            )
            self.differing_pixels += int(np.count_nonzero(a.mask != b.mask))
            self.mask_pixels += int(np.count_nonzero(a.mask | b.mask))
            self.dice_sum += float(dice_per_image(a.mask, b.mask)[0])

    def summary(self) -> dict[str, Any]:
        """``images``; ``max_probability_difference`` (anywhere, at the images' own sizes);
        ``mask_share_differing``: pixels where the masks differ over pixels in either mask (0 when both are empty
        everywhere); ``dice_between_runtimes``: the mean Dice of the two submissions, image by image (1 when both
        are empty)."""
        return {
            "images": self.images,
            "max_probability_difference": self.max_probability_difference,
            "mask_share_differing": self.differing_pixels / self.mask_pixels if self.mask_pixels else 0.0,
            "dice_between_runtimes": self.dice_sum / self.images if self.images else 1.0,
        }

    def check(self, what: str) -> None:
        """Refuse a disagreement beyond :data:`MAX_PROBABILITY_DIFFERENCE` or :data:`MAX_MASK_SHARE_DIFFERING`.

        Args:
            what: the ONNX models checked, for the message.

        Raises:
            DataError: names the figures, the tolerances and what to do.
        """
        numbers = self.summary()
        if (
            numbers["max_probability_difference"] > MAX_PROBABILITY_DIFFERENCE
            or numbers["mask_share_differing"] > MAX_MASK_SHARE_DIFFERING
        ):
            raise DataError(
                f"{what}: ONNX Runtime disagrees with torch on {numbers['images']} images: probabilities differ by up "
                f"to {numbers['max_probability_difference']:.3g} (tolerance {MAX_PROBABILITY_DIFFERENCE:g}) and "
                f"{numbers['mask_share_differing']:.3g} of the mask pixels differ (tolerance "
                f"{MAX_MASK_SHARE_DIFFERING:g}); the ONNX export does not reproduce this model: report it with the "
                f"model block of the config"
            )
