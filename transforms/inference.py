"""Inference: ``BeamvisionModelHandler`` for model artifacts and ``ClassifyImages``.

``ClassifyImages`` runs Beam's ``RunInference`` with a ``KeyedModelHandler``
around ``BeamvisionModelHandler``: keys (``ImageKey``: URI and image metadata)
travel beside uint8 pixel batches. The handler owns how a batch is computed,
so another engine can replace it without touching the pipeline:

- one model per worker process (Beam's ``Shared`` handle), loaded from the
  artifact in ``load_model``;
- a fixed batch shape: the last, short batch of a bundle is padded, so the
  compiled graph is traced once;
- top-k and the optional embedding are computed inside the graph.

Failed batches go to the error output (stage ``inference``), one row per image.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from beamvision.transforms.rows import METRICS_NAMESPACE, error_row, file_identity, utc_now


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Top-k classes of one image, best first, and its embedding if asked for."""

    labels: list[str]
    scores: list[float]
    embedding: list[float] | None = None


class Classifier:
    """A loaded artifact compiled for one fixed batch shape.

    Calling it with up to ``batch_size`` uint8 images returns one ``Prediction`` each.
    """

    def __init__(self, artifact, batch_size: int, top_k: int, embeddings: bool):
        import keras
        import tensorflow as tf

        from beamvision.models import get_spec

        manifest = artifact.manifest
        self.batch_size = batch_size
        self.labels = np.asarray(manifest.labels, dtype=object)
        size = manifest.input_size
        outputs = [artifact.model.output]
        if embeddings:
            features = artifact.model.get_layer(get_spec(manifest.architecture).classifier_layer).input
            if len(features.shape) == 4:
                features = keras.layers.GlobalAveragePooling2D(name="embedding_pool")(features)
            outputs.append(features)
        model = keras.Model(artifact.model.inputs, outputs)
        k = min(top_k, len(manifest.labels))

        @tf.function(input_signature=[tf.TensorSpec([batch_size, size, size, 3], tf.uint8)])
        def predict(images):
            outputs = model(images, training=False)
            probabilities, *rest = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            top = tf.math.top_k(probabilities, k=k)
            return [top.values, top.indices, *rest]

        self._predict = predict

    def __call__(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        count = len(images)
        batch = np.zeros((self.batch_size, *images[0].shape), dtype=np.uint8)
        batch[:count] = np.stack(images)
        scores, indices, *embedding = (t.numpy() for t in self._predict(batch))
        embedding = embedding[0] if embedding else None
        return [
            Prediction(
                labels=self.labels[indices[i]].tolist(),
                scores=scores[i].tolist(),
                embedding=None if embedding is None else embedding[i].tolist(),
            )
            for i in range(count)
        ]


class BeamvisionModelHandler(ModelHandler[np.ndarray, Prediction, Classifier]):
    """ModelHandler for beamvision model artifacts: uint8 images in, Predictions out."""

    def __init__(self, model_uri: str, batch_size: int = 32, top_k: int = 5, embeddings: bool = False):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._model_uri = model_uri
        self._batch_size = batch_size
        self._top_k = top_k
        self._embeddings = embeddings
        self._batches = Metrics.counter(METRICS_NAMESPACE, "batches")
        self._batch_ms = Metrics.distribution(METRICS_NAMESPACE, "inference_batch_ms")

    def load_model(self) -> Classifier:
        from beamvision.models.artifact import load_artifact

        return Classifier(load_artifact(self._model_uri), self._batch_size, self._top_k, self._embeddings)

    def run_inference(
        self, batch: Sequence[np.ndarray], model: Classifier, inference_args: dict[str, Any] | None = None
    ) -> list[Prediction]:
        started = time.perf_counter()
        predictions = model(batch)
        self._batches.inc()
        self._batch_ms.update(int((time.perf_counter() - started) * 1000))
        return predictions

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(image.nbytes for image in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE


class ClassifyImages(beam.PTransform):
    """(ImageKey, uint8 pixels) to result rows; failed batches to error rows.

    Returns a dict of PCollections: ``results`` and ``errors``.
    """

    def __init__(self, handler: BeamvisionModelHandler, model_name: str, model_version: str):
        super().__init__()
        self._handler = handler
        self._model_name = model_name
        self._model_version = model_version

    def expand(self, images):
        predicted, failed = (
            images
            | "RunInference" >> RunInference(KeyedModelHandler(self._handler)).with_exception_handling()
        )
        results = predicted | "FormatResults" >> beam.ParDo(
            _FormatResultFn(self._model_name, self._model_version)
        )
        errors = failed.failed_inferences | "FailedBatchesToErrors" >> beam.FlatMap(_failed_batch_rows)
        return {"results": results, "errors": errors}


def _failed_batch_rows(failure):
    batch, exc = failure
    error_type, message = _describe(exc)
    for key, _pixels in batch:
        yield error_row(key.uri, "inference", error_type, message, key.size_bytes, key.modified, key.sha256)


def _describe(exc) -> tuple[str, str]:
    """(type name, message) of an exception, or of Beam's (type, repr, traceback) tuple for one."""
    if isinstance(exc, BaseException):
        return type(exc).__name__, str(exc)
    if isinstance(exc, tuple) and exc and isinstance(exc[0], type):
        return exc[0].__name__, str(exc[1]) if len(exc) > 1 else ""
    return "InferenceError", str(exc)


class _FormatResultFn(beam.DoFn):
    """(ImageKey, Prediction) to a result row; logs progress every 10 seconds."""

    LOG_EVERY_SECONDS = 10.0

    def __init__(self, model_name: str, model_version: str):
        self._model_name = model_name
        self._model_version = model_version
        self._classified = Metrics.counter(METRICS_NAMESPACE, "images_classified")

    def setup(self):
        self._count = 0
        self._started = self._last_log = time.monotonic()

    def process(self, element):
        key, prediction = element
        row = {
            "image_uri": key.uri,
            "label": prediction.labels[0],
            "score": prediction.scores[0],
            "top_k_labels": prediction.labels,
            "top_k_scores": prediction.scores,
            "width": key.width,
            "height": key.height,
            "format": key.format,
            **file_identity(key.size_bytes, key.modified),
            "sha256": key.sha256,
            "model_name": self._model_name,
            "model_version": self._model_version,
            "processed_at": utc_now(),
        }
        if prediction.embedding is not None:
            row["embedding"] = prediction.embedding
        self._classified.inc()
        self._log_progress()
        yield row

    def _log_progress(self):
        self._count += 1
        now = time.monotonic()
        if now - self._last_log >= self.LOG_EVERY_SECONDS:
            self._last_log = now
            rate = self._count / (now - self._started)
            logging.getLogger("beamvision").info(
                "classified %d images in this worker (%.1f images/s)", self._count, rate
            )
