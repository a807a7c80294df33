"""Inference: ``BeamvisionModelHandler`` for model artifacts and ``ClassifyImages``.

``ClassifyImages`` runs Beam's ``RunInference`` with a ``KeyedModelHandler``
around ``BeamvisionModelHandler``: keys (``ImageKey``: URI and image metadata)
travel beside uint8 pixel batches. The handler owns how a batch is computed,
so another engine can replace it without touching the pipeline:

- one model per worker process (Beam's ``Shared`` handle), or with
  ``--model_copies N`` N per machine shared by its processes (Beam's
  ``model_copies``, served to the others over Beam's multi-process proxy: for
  models too large to hold once per process), loaded from the artifact in
  ``load_model`` and built by the engine ``--engine`` names
  (``beamvision.transforms.engines``: TensorFlow or OpenVINO, at ``--precision``,
  on the threads ``beamvision.transforms.sizing`` gives the process or the copy);
- a fixed batch shape: the last, short batch of a bundle is padded, so the
  compiled model is traced once.

Failed batches go to the error output (stage ``inference``), one row per image.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from beamvision.transforms.engines import DEFAULT_ENGINE, Prediction, build_classifier, load_for_engine
from beamvision.transforms.rows import METRICS_NAMESPACE, error_row, exception_parts, file_identity, utc_now
from beamvision.transforms.sizing import DEFAULT_SIZING, WorkerSizing, available_cores

FIRST_BATCH_METRIC = "first_batch_unix_ms"
# Beam's RunInference records how long each worker took to load its model, in our namespace.
MODEL_LOAD_METRIC = "load_model_latency_milli_secs"


def start_up_timing(result, started_at: float) -> dict[str, float]:
    """Seconds from launch to the first classified batch, and the slowest model load, from a run's metrics.

    Empty where the runner reports no metrics.
    """
    from apache_beam.metrics.metric import MetricsFilter

    try:
        queried = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    except Exception:  # a runner without metrics support: no timing, not an error
        return {}
    values = {}
    for record in queried["distributions"]:
        value = record.committed or record.attempted
        if value is not None and value.count:
            name = record.key.metric.name
            values[name] = (
                min(values.get(name, value.min), value.min)
                if name == FIRST_BATCH_METRIC
                else max(values.get(name, value.max), value.max)
            )
    timing = {}
    if FIRST_BATCH_METRIC in values:
        timing["first_batch_seconds"] = round(values[FIRST_BATCH_METRIC] / 1000 - started_at, 2)
    if MODEL_LOAD_METRIC in values:
        timing["model_load_seconds"] = round(values[MODEL_LOAD_METRIC] / 1000, 2)
    return timing


class BeamvisionModelHandler(ModelHandler[np.ndarray, Prediction, Any]):
    """ModelHandler for beamvision model artifacts: uint8 images in, Predictions out.

    ``engine`` (``engines.ENGINES``) and ``precision`` (``engines.PRECISIONS``)
    choose how a batch is computed, on each worker; ``sizing`` its threads and
    whether the machine's processes share ``model_copies`` models.
    """

    def __init__(
        self,
        model_uri: str,
        batch_size: int = 32,
        top_k: int = 5,
        embeddings: bool = False,
        engine: str = DEFAULT_ENGINE,
        precision: str = "fp32",
        sizing: WorkerSizing = DEFAULT_SIZING,
        threshold: float | None = None,
    ):
        super().__init__(
            min_batch_size=batch_size, max_batch_size=batch_size, model_copies=sizing.model_copies
        )
        self._model_uri = model_uri
        self._batch_size = batch_size
        self._top_k = top_k
        self._embeddings = embeddings
        self._engine = engine
        self._precision = precision
        self._sizing = sizing
        self._threshold = threshold  # --threshold: every class's, of a multi-label model
        self._first_batch_done = False
        self._batches = Metrics.counter(METRICS_NAMESPACE, "batches")
        self._batch_ms = Metrics.distribution(METRICS_NAMESPACE, "inference_batch_ms")
        # When each worker process finished its first batch (Unix ms; the minimum is the job's first).
        self._first_batch = Metrics.distribution(METRICS_NAMESPACE, FIRST_BATCH_METRIC)

    def load_model(self):
        threads = self._sizing.resolve()
        logging.getLogger("beamvision").info(
            "worker sizing on %d cores: %s; threads: read %d, decode %d, inference %d",
            available_cores(),
            self._sizing.describe(),
            threads.read,
            threads.decode,
            threads.inference,
        )
        return build_classifier(
            self._engine,
            load_for_engine(self._model_uri, self._engine, threads.inference),
            self._batch_size,
            self._top_k,
            self._embeddings,
            self._precision,
            threads.inference,
            self._threshold,
        )

    def run_inference(
        self, batch: Sequence[np.ndarray], model, inference_args: dict[str, Any] | None = None
    ) -> list[Prediction]:
        started = time.perf_counter()
        predictions = model(batch)
        if not self._first_batch_done:  # (a shared model is a proxy: the flag lives here)
            self._first_batch_done = True
            self._first_batch.update(int(time.time() * 1000))
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
    error_type, message = exception_parts(exc, unknown="InferenceError")
    for key, _pixels in batch:
        yield error_row(key.uri, "inference", error_type, message, key.size_bytes, key.modified, key.sha256)


class _FormatResultFn(beam.DoFn):
    """(ImageKey, Prediction) to a result row (the run's progress is ``transforms.progress``)."""

    def __init__(self, model_name: str, model_version: str):
        self._model_name = model_name
        self._model_version = model_version
        self._classified = Metrics.counter(METRICS_NAMESPACE, "images_classified")

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
        if prediction.chosen is not None:  # a multi-label model's label set
            row["labels"] = prediction.chosen
        if prediction.embedding is not None:
            row["embedding"] = prediction.embedding
        self._classified.inc()
        yield row
