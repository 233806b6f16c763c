"""Images of any size -> pneumothorax masks at that size: the fold ensemble, its TTA and the post-processing in one
object, shared by stage 05 (the test set) and the server.

::

    predictor = Predictor.from_experiment(cfg)              # 03_train's folds, the tta section, 04's thresholds
    [prediction] = predictor.predict([pixels])               # pixels: uint8 H x W, e.g. from read_dicom
    prediction.rle(), prediction.area, prediction.max_prob, prediction.gate

Each image is resized to the models' square size with :func:`pneumoseg.data.resize.resize_square`, the function that
made stage 01's PNGs, so :meth:`Predictor.predict` on a DICOM's pixels and :meth:`Predictor.predict_prepared` on
its stage-01 PNG give the same masks. The averaged probabilities are brought back to the image's own size
(bilinear up, area-averaged down) and post-processed there; the post-processing's areas are in pixels of the
1024 px image and scale with the map (see :mod:`pneumoseg.postprocess.strategies`). Models with the image-level gate
head give each image a gate probability, averaged like the maps, which the post-processing receives (a ``gated``
strategy empties an image below its threshold) and the prediction reports.

An ensemble of experiments (:class:`EnsemblePredictor`) is a :class:`Predictor` per member, each with its own folds,
TTA and image size: the members' probabilities are blended at the image's size with the members' weights
(:func:`pneumoseg.data.blend.blend_maps`, the blend stage 04 searched on), and post-processed once::

    ensemble = EnsemblePredictor.from_experiments([(cfg_a, 1.0), (cfg_b, 1.0)], postprocessor)
    [prediction] = ensemble.predict([pixels])

Memory grows with the number of images passed in one call (a full-size probability map each): stream large sets
through in batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from pneumoseg import layout
from pneumoseg.data import rle
from pneumoseg.data.blend import blend_gates, blend_maps, normalized_weights
from pneumoseg.data.fold_table import FOLD_COLUMN, read_trained_folds
from pneumoseg.data.resize import resize_probabilities, resize_square
from pneumoseg.errors import ConfigError, DataError
from pneumoseg.inference.fold_models import FoldModel, load_fold_models
from pneumoseg.inference.runtime import ONNXRUNTIME, choose_runtime, runtime_of, with_runtime
from pneumoseg.inference.tta import TTA, predict_with_gate
from pneumoseg.modeling.device import resolve_device
from pneumoseg.modeling.models import has_gate
from pneumoseg.postprocess.strategies import Gated, PostProcessor, build_postprocessor, load_postprocessor


@dataclass
class Prediction:
    """The prediction for one image, at the image's original size.

    Attributes:
        probs: float32 H x W ensemble probabilities.
        mask: bool H x W mask after post-processing; what is submitted.
        gate: the image-level probability of a pneumothorax from the models' gate head (None without one).
        emptied_by_gate: the gate emptied the image although the mask strategy alone would have marked pixels.
    """

    probs: np.ndarray
    mask: np.ndarray
    gate: float | None = None
    emptied_by_gate: bool = False

    def rle(self, fmt: str = "relative") -> str:
        """The mask as a run-length string (``"-1"`` when empty); ``fmt`` as in :func:`pneumoseg.data.rle.encode`."""
        return rle.encode(self.mask, fmt)

    @property
    def area(self) -> int:
        """Pixels in the mask."""
        return int(np.count_nonzero(self.mask))

    @property
    def max_prob(self) -> float:
        """The highest probability anywhere in the image."""
        return float(self.probs.max())

    @property
    def has_pneumothorax(self) -> bool:
        return self.area > 0


class Predictor:
    """A fold ensemble with its test-time augmentation and post-processing.

    Args:
        models: the fold models (all trained at one size, on one device); their probabilities are averaged.
        tta: the views of each image averaged per model.
        postprocessor: probabilities -> mask, applied at the image's original size.
        interpolation: how images are resized to the models' size; must be stage 01's ``prepare.interpolation``
            for :meth:`predict` to match :meth:`predict_prepared` on stage 01's PNGs.
        batch_size: images per forward pass.
        amp: autocast on a GPU (``auto``, ``fp16``, ``bf16`` or None); the CPU always runs fp32.

    Raises:
        ValueError: no models.
        DataError: models trained at different sizes.
        ConfigError: a gated post-processing for models without the gate head.
    """

    def __init__(
        self,
        models: list[FoldModel],
        tta: TTA,
        postprocessor: PostProcessor,
        interpolation: str = "area",
        batch_size: int = 16,
        amp: str | None = "auto",
    ) -> None:
        if not models:
            raise ValueError("a Predictor needs at least one model")
        sizes = sorted({m.image_size for m in models})
        if len(sizes) > 1:
            found = ", ".join(f"{m.path} ({m.image_size} px)" for m in models)
            raise DataError(
                f"the models were trained at different sizes {sizes}: {found}; an ensemble predicts "
                f"at one size, so retrain the folds at one train.image_size"
            )
        if batch_size < 1:
            raise ConfigError(f"the prediction batch size must be at least 1, got {batch_size}")
        check_gate(postprocessor, models)
        self.models = list(models)
        self.tta = tta
        self.postprocessor = postprocessor
        self.interpolation = interpolation
        self.batch_size = int(batch_size)
        self.amp = amp

    @property
    def image_size(self) -> int:
        """The square size the models take, in pixels."""
        return self.models[0].image_size

    @property
    def device(self) -> torch.device:
        return next(self.models[0].net.parameters()).device

    @property
    def runtime(self) -> str:
        """What computes the models' outputs: ``torch`` or ``onnxruntime`` (see :mod:`pneumoseg.inference.runtime`)."""
        return runtime_of(self.models)

    @property
    def image_sizes(self) -> tuple[int, ...]:
        """The square sizes of the prepared images :meth:`predict_prepared` takes (one here)."""
        return (self.image_size,)

    @property
    def n_views(self) -> int:
        """Forward passes per image: models times TTA views."""
        return len(self.models) * len(self.tta.views())

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Predict images of any size.

        Args:
            images: uint8 H x W grey images (0 is black), such as :func:`pneumoseg.data.dicom.read_dicom` returns.

        Returns:
            One :class:`Prediction` per image, at that image's size.

        Raises:
            DataError: an image that is not a non-empty 2-D uint8 array.
        """
        return make_predictions(*self.probabilities(images), self.postprocessor)

    def predict_prepared(
        self,
        images: np.ndarray | torch.Tensor | Mapping[int, np.ndarray | torch.Tensor],
        original_shapes: Sequence[tuple[int, int]],
    ) -> list[Prediction]:
        """Predict images already resized to :attr:`image_size` (stage 01's PNGs).

        Args:
            images: uint8 N x S x S, S = :attr:`image_size`; or such batches by size (the one of S is used), as an
                :class:`EnsemblePredictor` takes them.
            original_shapes: ``(rows, cols)`` of each image's original; predictions come back at that size.

        Raises:
            DataError: images of another size, or a shape count that differs from the image count.
        """
        return make_predictions(*self.probabilities_prepared(images, original_shapes), self.postprocessor)

    def probabilities(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray | None]:
        """The ensemble probabilities of images of any size, each at its own size (float32 H x W), before the
        post-processing, and each image's gate probability (float32 N; None when no model has the gate head);
        arguments and errors as for :meth:`predict`."""
        check_images(images)
        if not images:
            return [], None
        return self.probabilities_prepared(self.prepare(images), [image.shape for image in images])

    def prepare(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 H x W images of any size (already checked by :func:`check_images`) as one N x S x S batch at the
        models' size, resized as stage 01 resizes its PNGs."""
        return np.stack([resize_square(image, self.image_size, self.interpolation) for image in images])

    def probabilities_prepared(
        self,
        images: np.ndarray | torch.Tensor | Mapping[int, np.ndarray | torch.Tensor],
        original_shapes: Sequence[tuple[int, int]],
    ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """The probabilities of prepared images, each brought back to its original size, and their gate
        probabilities, as :meth:`probabilities` gives them; arguments and errors as for :meth:`predict_prepared`."""
        batch = self.prepared_batch(images)
        if len(original_shapes) != len(batch):
            raise DataError(f"{len(batch)} images but {len(original_shapes)} original shapes")
        probs, gates = self.model_probabilities(batch)
        full_maps = [
            resize_probabilities(small, int(rows), int(cols)) for small, (rows, cols) in zip(probs, original_shapes)
        ]
        return full_maps, gates

    def model_probabilities(
        self, images: np.ndarray | torch.Tensor | Mapping[int, np.ndarray | torch.Tensor]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The averaged probabilities of prepared images at the models' size (float32 N x S x S), before they are
        brought back to any image's size, and their gate probabilities; ``images`` as for :meth:`predict_prepared`.

        Raises:
            DataError: images of another size.
        """
        return predict_with_gate(
            self.models, self.prepared_batch(images), self.tta, batch_size=self.batch_size, amp=self.amp
        )

    def prepared_batch(
        self, images: np.ndarray | torch.Tensor | Mapping[int, np.ndarray | torch.Tensor]
    ) -> np.ndarray | torch.Tensor:
        """The batch at :attr:`image_size` (picked from batches by size), checked to be N x S x S."""
        if isinstance(images, Mapping):
            images = _batch_of_size(images, self.image_size)
        if tuple(images.shape[1:]) != (self.image_size, self.image_size):
            raise DataError(
                f"prepared images must be N x {self.image_size} x {self.image_size} (the models' size), "
                f"got {tuple(images.shape)}; use stage 01's PNGs of {self.image_size} px "
                f"({layout.images_dir('.', self.image_size)} of the prepared folder)"
            )
        return images

    @classmethod
    def from_experiment(
        cls,
        cfg: DictConfig,
        device: str | torch.device | None = None,
        postprocessor: PostProcessor | None = None,
        runtime: str | None = None,
    ) -> Predictor:
        """The predictor of an experiment's outputs.

        Models: the ``predict.top_k`` best checkpoints of the ``predict.checkpoints`` set (``best``, ``ema``,
        ``averaged``) of each fold of ``train.folds`` (``all``: every fold of ``03_train/folds.csv``) in
        ``${paths.experiment_dir}/03_train``; TTA: the ``tta`` section;
        post-processing: ``postprocess.source`` (stage 04's ``thresholds.json`` or the config's block, see
        :func:`configured_postprocessor`); resizing: ``prepare.interpolation``; batch size
        and AMP: ``predict.batch_size`` and ``predict.amp``; runtime: ``predict.runtime`` (an experiment has no ONNX
        files, so ``auto`` is torch, and ``onnxruntime`` exports each model in memory first; see
        :mod:`pneumoseg.inference.runtime`).

        Args:
            cfg: the resolved config.
            device: ``auto``, ``cpu``, ``cuda`` or a torch device; default ``predict.device``.
            postprocessor: instead of the configured one (an ensemble member's is the ensemble's).
            runtime: instead of ``predict.runtime`` (stage 06 exports torch models).

        Raises:
            ConfigError: ``predict.top_k`` below 1 or above ``train.keep_best``, a device that is not there, or a
                ``train.folds`` fold that ``03_train/folds.csv`` does not have.
            DataError: missing checkpoints or thresholds.
        """
        predict = cfg.predict
        top_k = int(predict.top_k)
        if not 1 <= top_k <= int(cfg.train.keep_best):
            raise ConfigError(
                f"predict.top_k={top_k} must be between 1 and train.keep_best={cfg.train.keep_best} "
                f"(the checkpoints stage 03 keeps per fold)"
            )
        if not isinstance(device, torch.device):
            device = resolve_device(str(device or predict.device))
        folder = layout.train_dir(cfg)
        folds = layout.select_folds(
            cfg.train.folds, read_trained_folds(cfg)[FOLD_COLUMN].unique(), "train.folds", layout.train_folds_path(cfg)
        )
        models = load_fold_models(folder, folds, top=top_k, device=device, checkpoints=str(predict.checkpoints))
        requested = str(runtime or predict.get("runtime", "auto"))
        models = with_runtime(models, choose_runtime(requested, device, has_onnx=requested == ONNXRUNTIME), None)
        return cls(
            models,
            TTA.from_config(cfg.get("tta")),
            postprocessor or configured_postprocessor(cfg),
            interpolation=str(cfg.prepare.interpolation),
            batch_size=int(predict.batch_size),
            amp=predict.amp,
        )


def make_predictions(
    full_maps: Sequence[np.ndarray], gates: np.ndarray | None, postprocessor: PostProcessor
) -> list[Prediction]:
    """The predictions of images from their (ensemble) probabilities at their original sizes and their gate
    probabilities (None without a gate head): the one place both predictors post-process."""
    predictions = []
    for k, full in enumerate(full_maps):
        gate = None if gates is None else float(gates[k])
        predictions.append(
            Prediction(
                probs=full,
                mask=postprocessor(full, gate),
                gate=gate,
                emptied_by_gate=postprocessor.emptied_by_gate(full, gate),
            )
        )
    return predictions


def check_gate(postprocessor: PostProcessor, models: Sequence[FoldModel]) -> None:
    """Refuse a gated post-processing for models of which none has the gate head.

    Raises:
        ConfigError: names the strategy and the fix.
    """
    if postprocessor.needs_gate and not any(has_gate(m.net) for m in models):
        raise ConfigError(
            f"the post-processing {postprocessor.to_block()} needs a gate probability, but no model "
            f"has the gate head: retrain with model.params.aux_params and loss.gate_weight, or "
            f"search without search.gate_thresholds"
        )


def check_images(images: Sequence[np.ndarray]) -> None:
    """Refuse anything but non-empty 2-D uint8 grey images.

    Raises:
        DataError: names the first image that is not one.
    """
    for index, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 2 or not image.size:
            described = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise DataError(f"image {index}: expected a non-empty 2-D uint8 grey image, got {described}")


def _batch_of_size(batches: Mapping[int, np.ndarray | torch.Tensor], size: int) -> np.ndarray | torch.Tensor:
    try:
        return batches[size]
    except KeyError:
        raise DataError(
            f"no prepared images of {size} px among the batches given (sizes {sorted(batches)}); "
            f"give stage 01's PNGs of {size} px too "
            f"({layout.images_dir('.', size)} of the prepared folder)"
        ) from None


class EnsemblePredictor:
    """Experiments blended: each member's predictor (its folds, TTA, image size and resizing) gives probabilities
    at each image's original size, which are averaged there with the weights and post-processed once.

    Args:
        members: one :class:`Predictor` per member experiment, on one device (their post-processors are unused).
        weights: one positive weight per member (scaled to sum to 1).
        postprocessor: the blend's post-processing (stage 04's choice on the blended OOF maps).
        names: the members' experiment names, for the record.

    Raises:
        ValueError: no members, or as many names or weights as members there are not.
        ConfigError: a weight that is not positive.
    """

    def __init__(
        self,
        members: Sequence[Predictor],
        weights: Sequence[float],
        postprocessor: PostProcessor,
        names: Sequence[str] | None = None,
    ) -> None:
        if not members:
            raise ValueError("an EnsemblePredictor needs at least one member")
        names = list(names) if names is not None else [f"member{k}" for k in range(len(members))]
        if len(weights) != len(members) or len(names) != len(members):
            raise ValueError(f"{len(members)} members, {len(weights)} weights and {len(names)} names")
        normalized_weights(weights)
        self.members, self.weights, self.names = list(members), [float(w) for w in weights], names
        check_gate(postprocessor, self.models)
        self.postprocessor = postprocessor

    @property
    def models(self) -> list[FoldModel]:
        """Every member's fold models, member by member."""
        return [model for member in self.members for model in member.models]

    @property
    def n_views(self) -> int:
        """Forward passes per image: every member's models times its TTA views."""
        return sum(member.n_views for member in self.members)

    @property
    def image_sizes(self) -> tuple[int, ...]:
        """The square sizes of the prepared images :meth:`predict_prepared` takes, one per distinct member size."""
        return tuple(sorted({member.image_size for member in self.members}))

    @property
    def image_size(self) -> int:
        """The largest member size: a side at which an image reaches every member without being enlarged."""
        return max(self.image_sizes)

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def runtime(self) -> str:
        """What computes the members' outputs: ``torch`` or ``onnxruntime``."""
        return self.members[0].runtime

    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Predict images of any size, as :meth:`Predictor.predict` does, with every member."""
        check_images(images)
        if not images:
            return []
        per_member = [member.model_probabilities(member.prepare(images)) for member in self.members]
        return make_predictions(*self._blend(per_member, [image.shape for image in images]), self.postprocessor)

    def predict_prepared(
        self, images: Mapping[int, np.ndarray | torch.Tensor], original_shapes: Sequence[tuple[int, int]]
    ) -> list[Prediction]:
        """Predict prepared images: ``images`` maps each of :attr:`image_sizes` to the batch of the same images at
        that size (stage 01's PNGs); otherwise as :meth:`Predictor.predict_prepared`."""
        return make_predictions(*self.probabilities_prepared(images, original_shapes), self.postprocessor)

    def probabilities_prepared(
        self, images: Mapping[int, np.ndarray | torch.Tensor], original_shapes: Sequence[tuple[int, int]]
    ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """The blended probabilities of prepared images at their original sizes, before the post-processing, and
        their blended gate probabilities; arguments as for :meth:`predict_prepared`.

        Raises:
            DataError: a member size missing from ``images``, or a shape count that differs from the image count.
        """
        batches = [member.prepared_batch(images) for member in self.members]
        if any(len(batch) != len(original_shapes) for batch in batches):
            raise DataError(
                f"{[len(batch) for batch in batches]} images (per member) but {len(original_shapes)} original shapes"
            )
        per_member = [member.model_probabilities(batch) for member, batch in zip(self.members, batches)]
        return self._blend(per_member, original_shapes)

    def _blend(
        self, per_member: list[tuple[np.ndarray, np.ndarray | None]], original_shapes: Sequence[tuple[int, int]]
    ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Per image, the members' maps at their models' sizes blended at the image's original size
        (:func:`pneumoseg.data.blend.blend_maps`, as stage 04 blends the OOF maps); the gate probabilities of the
        members that have a gate head blended with their weights (None when no member has one)."""
        maps = [
            blend_maps([probs[k] for probs, _ in per_member], self.weights, int(rows), int(cols))
            for k, (rows, cols) in enumerate(original_shapes)
        ]
        return maps, blend_gates([gates for _, gates in per_member], self.weights)

    @classmethod
    def from_experiments(
        cls,
        members: Sequence[tuple[DictConfig, float]],
        postprocessor: PostProcessor,
        device: str | torch.device | None = None,
        runtime: str | None = None,
    ) -> EnsemblePredictor:
        """The ensemble of experiments' outputs, each loaded by :meth:`Predictor.from_experiment` (its folds, TTA,
        resizing and batch size).

        Args:
            members: each member's resolved config and weight.
            postprocessor: the blend's post-processing.
            device: as for :meth:`Predictor.from_experiment`; default the first member's ``predict.device``.
            runtime: as for :meth:`Predictor.from_experiment`; default each member's ``predict.runtime``.
        """
        if not isinstance(device, torch.device):
            device = resolve_device(str(device or members[0][0].predict.device))
        # The members' own post-processors are never applied; a gated one would be refused for a member without
        # the head although the blend has the other members' gate, so members get its mask strategy.
        member_postprocessor = postprocessor.inner if isinstance(postprocessor, Gated) else postprocessor
        predictors = [Predictor.from_experiment(cfg, device, member_postprocessor, runtime) for cfg, _ in members]
        return cls(
            predictors, [weight for _, weight in members], postprocessor, [str(cfg.experiment) for cfg, _ in members]
        )


_SOURCES = {
    "search": lambda cfg: load_postprocessor(layout.thresholds_path(cfg)),
    "config": lambda cfg: build_postprocessor(cfg.postprocess),
}


def configured_postprocessor(cfg: DictConfig) -> PostProcessor:
    """The post-processing of inference: stage 04's choice (``postprocess.source: search``) or the config's own
    ``postprocess`` block (``source: config``)."""
    try:
        source = _SOURCES[cfg.postprocess.source]
    except KeyError:
        raise ConfigError(
            f"postprocess.source must be one of {sorted(_SOURCES)}, not {cfg.postprocess.source!r}"
        ) from None
    return source(cfg)
