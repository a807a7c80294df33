"""Inference engines: how a batch of uint8 images becomes top-k classes (and embeddings).

``ENGINES`` maps ``--engine`` to a classifier class; each is built from a
loaded artifact for one fixed batch shape and called with up to
``batch_size`` images, returning one ``Prediction`` each. The model handler
picks one by name; nothing else in the pipeline changes.

- ``tensorflow``: the Keras model as one compiled ``tf.function``; top-k and the
  embedding inside the graph. ``bf16`` computes with a Keras mixed-precision
  copy of the model (bfloat16 compute, float32 weights).
- ``openvino``: the same Keras model converted to OpenVINO (``openvino.convert_model``
  on the traced function, on the worker), compiled for the CPU with the
  precision as its inference hint; top-k in NumPy.

``--precision auto`` is ``bf16`` where the CPU computes bf16 natively
(AVX512_BF16 or AMX, by ``/proc/cpuinfo``), ``fp32`` elsewhere. Each engine
computes on ``threads`` threads (``beamvision.transforms.sizing``: the
worker process's share of the machine's cores).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
from collections.abc import Sequence

import numpy as np

PRECISIONS = ("auto", "fp32", "bf16")
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Top-k classes of one image, best first, and its embedding if asked for."""

    labels: list[str]
    scores: list[float]
    embedding: list[float] | None = None


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX), from ``/proc/cpuinfo``."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return any(flag in flags for flag in _BF16_CPU_FLAGS)


def resolve_precision(precision: str, cpuinfo: str | None = None) -> str:
    """``fp32`` or ``bf16`` for a ``--precision`` value (``auto`` follows the CPU)."""
    if precision == "auto":
        return "bf16" if native_bf16(cpuinfo) else "fp32"
    return precision


def inference_function(artifact, batch_size: int | None, embeddings: bool):
    """The artifact's model as a ``tf.function`` on uint8 batches of ``batch_size`` (None: any).

    It returns ``probabilities`` and, with ``embeddings``, ``embedding`` (the pooled features).
    """
    import keras
    import tensorflow as tf

    from beamvision.models import get_spec

    manifest = artifact.manifest
    outputs = [artifact.model.output]
    if embeddings:
        features = artifact.model.get_layer(get_spec(manifest.architecture).classifier_layer).input
        if len(features.shape) == 4:
            features = keras.layers.GlobalAveragePooling2D(name="embedding_pool")(features)
        outputs.append(features)
    model = keras.Model(artifact.model.inputs, outputs)
    size = manifest.input_size

    @tf.function(input_signature=[tf.TensorSpec([batch_size, size, size, 3], tf.uint8)])
    def predict(images):
        result = model(images, training=False)
        probabilities, *rest = result if isinstance(result, (list, tuple)) else [result]
        return {"probabilities": probabilities, **({"embedding": rest[0]} if rest else {})}

    return predict


class _Engine:
    """Pads a short batch to the fixed shape and turns outputs into Predictions."""

    @staticmethod
    def before_load(threads: int | None) -> None:
        """Process-wide set-up that must precede loading the artifact (nothing, unless overridden)."""

    def __init__(self, artifact, batch_size: int, top_k: int):
        self.batch_size = batch_size
        self.labels = np.asarray(artifact.manifest.labels, dtype=object)
        self.k = min(top_k, len(self.labels))

    def _batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        batch = np.zeros((self.batch_size, *images[0].shape), dtype=np.uint8)
        batch[: len(images)] = np.stack(images)
        return batch

    def _predictions(self, count: int, scores, indices, embedding) -> list[Prediction]:
        return [
            Prediction(
                labels=self.labels[indices[i]].tolist(),
                scores=scores[i].tolist(),
                embedding=None if embedding is None else embedding[i].tolist(),
            )
            for i in range(count)
        ]


def set_tensorflow_threads(threads: int | None) -> None:
    """Sizes TensorFlow's thread pools for this process, unless its runtime already started.

    The pools are the process's and fixed once TensorFlow runs its first op
    (a model loaded earlier in the same process, as in tests): then they stay.
    """
    import tensorflow as tf

    if threads is None:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        current = tf.config.threading.get_intra_op_parallelism_threads()
        logging.getLogger("beamvision").info(
            "TensorFlow is already running in this process: it keeps %s threads", current or "its default"
        )


class TensorFlowClassifier(_Engine):
    """The Keras model as one compiled graph, top-k inside it."""

    # Loading the Keras model starts TensorFlow's runtime, which fixes its pools.
    before_load = staticmethod(set_tensorflow_threads)

    def __init__(
        self,
        artifact,
        batch_size: int,
        top_k: int,
        embeddings: bool,
        precision: str = "fp32",
        threads: int | None = None,  # (TensorFlow's pools are sized in before_load, before the model)
    ):
        import tensorflow as tf

        super().__init__(artifact, batch_size, top_k)
        if precision == "bf16":
            artifact = dataclasses.replace(artifact, model=_mixed_bfloat16(artifact.model))
        predict = inference_function(artifact, batch_size, embeddings)
        k = self.k

        @tf.function(input_signature=predict.input_signature)
        def top(images):
            out = predict(images)
            best = tf.math.top_k(tf.cast(out["probabilities"], tf.float32), k=k)
            extra = [tf.cast(out["embedding"], tf.float32)] if "embedding" in out else []
            return [best.values, best.indices, *extra]

        self._predict = top

    def __call__(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        scores, indices, *embedding = (t.numpy() for t in self._predict(self._batch(images)))
        return self._predictions(len(images), scores, indices, embedding[0] if embedding else None)


def _mixed_bfloat16(model):
    """A copy of ``model`` whose layers compute in bfloat16 (weights kept in float32): Keras mixed precision.

    Each layer is rebuilt from its config with the ``mixed_bfloat16`` policy
    (a saved layer's config names its own policy, so the global one would not apply).
    """
    import keras

    def mixed(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": "mixed_bfloat16"})

    copy = keras.models.clone_model(model, clone_function=mixed)
    copy.set_weights(model.get_weights())
    return copy


OPENVINO_FILES = ("openvino/model.xml", "openvino/model.bin")


def convert_openvino(artifact, folder: str) -> dict[str, str]:
    """Converts the artifact's model to OpenVINO IR in ``folder`` (any batch size, with the embedding).

    Returns ``save_artifact``'s ``extra_files``: name in the artifact -> local path.
    """
    import openvino as ov

    xml = os.path.join(folder, "model.xml")
    ov.save_model(ov.convert_model(inference_function(artifact, None, embeddings=True)), xml)
    return dict(zip(OPENVINO_FILES, (xml, os.path.join(folder, "model.bin")), strict=True))


def has_openvino_model(manifest) -> bool:
    """Whether an artifact holds its model converted to OpenVINO (``--engines openvino``)."""
    return all(name in manifest.files for name in OPENVINO_FILES)


def _openvino_model(artifact, batch_size: int, embeddings: bool):
    """The OpenVINO model: the artifact's (converted at export or train), else converted now."""
    import openvino as ov

    from beamvision.models.artifact import fetch_file

    if not has_openvino_model(artifact.manifest):
        logging.getLogger("beamvision").info("no OpenVINO model in %s: converting it", artifact.uri)
        return ov.convert_model(inference_function(artifact, batch_size, embeddings))
    with tempfile.TemporaryDirectory() as tmp:
        xml, _ = (fetch_file(artifact.uri, artifact.manifest, name, tmp) for name in OPENVINO_FILES)
        model = ov.Core().read_model(xml)  # (reads model.bin beside it: fetched under the same name)
    size = artifact.manifest.input_size
    model.reshape([batch_size, size, size, 3])  # a fixed shape compiles to the fastest kernels
    return model


class OpenVINOClassifier(_Engine):
    """The Keras model as OpenVINO (cached in the artifact, or converted), compiled at the given precision."""

    def __init__(
        self,
        artifact,
        batch_size: int,
        top_k: int,
        embeddings: bool,
        precision: str = "fp32",
        threads: int | None = None,
    ):
        import openvino as ov

        super().__init__(artifact, batch_size, top_k)
        converted = _openvino_model(artifact, batch_size, embeddings)
        config = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision]}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = ov.Core().compile_model(converted, "CPU", config)
        self._probabilities = self._compiled.output("probabilities")
        self._embedding = self._compiled.output("embedding") if embeddings else None
        # An infer request runs one batch at a time, and one model serves several threads: the
        # bundle threads of a process, and every process of a machine with --model_copies.
        self._requests = threading.local()

    def __call__(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        if not hasattr(self._requests, "request"):
            self._requests.request = self._compiled.create_infer_request()
        outputs = self._requests.request.infer([self._batch(images)])
        probabilities = np.asarray(outputs[self._probabilities], dtype=np.float32)
        indices = np.argsort(-probabilities, axis=1, kind="stable")[:, : self.k]
        scores = np.take_along_axis(probabilities, indices, axis=1)
        embedding = None if self._embedding is None else np.asarray(outputs[self._embedding], np.float32)
        return self._predictions(len(images), scores, indices, embedding)


ENGINES = {"tensorflow": TensorFlowClassifier, "openvino": OpenVINOClassifier}
CONVERTED_ENGINES = ("openvino",)  # engines whose converted model an artifact can store (--engines)


def engine_files(model, manifest, engines, folder: str) -> dict[str, str]:
    """Converted models for ``engines`` written under ``folder``: ``save_artifact``'s ``extra_files``."""
    from beamvision.models.artifact import Artifact

    files = {}
    if "openvino" in engines:
        files.update(convert_openvino(Artifact(uri=folder, model=model, manifest=manifest), folder))
    return files


def build_classifier(
    engine: str,
    artifact,
    batch_size: int,
    top_k: int,
    embeddings: bool,
    precision: str,
    threads: int | None = None,
):
    """The classifier of ``engine`` for a loaded artifact; ``precision`` as ``--precision`` gives it.

    ``threads``: how many threads compute (None: the engine's default, every core).
    """
    resolved = resolve_precision(precision)
    logging.getLogger("beamvision").info(
        "inference engine %s at %s on %s threads", engine, resolved, threads or "all"
    )
    return ENGINES[engine](artifact, batch_size, top_k, embeddings, resolved, threads)
