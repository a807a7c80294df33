"""Inference engines: how a batch of uint8 images becomes top-k classes (and embeddings).

An engine is one ``Engine`` subclass, and defining it registers it in
``ENGINES`` (its ``name`` is what ``--engine`` takes; ``--engine``,
``--precision`` and ``export``/``train --engines`` offer what the registry
holds). The class owns all that is known of the engine:

- the files of its converted model that an artifact may store (``files``:
  what ``--engines`` adds, ``convert`` writes them, ``holds`` says whether an
  artifact has them), and so whether it needs Keras and ``model.keras`` to
  load (``needs_keras``);
- the precisions it computes in (``precisions``) and whether it runs an INT8
  artifact (``runs_int8``; ``refusal`` says why it cannot run one);
- the set-up its process needs before any artifact is loaded (``before_load``);
- built from a loaded artifact for one fixed batch shape, it is called with up
  to ``batch_size`` images and returns one ``Prediction`` each.

The model handler picks one by name; nothing else in the pipeline changes.

- ``tensorflow``: the Keras model as one compiled ``tf.function``; top-k and the
  embedding inside the graph. ``bf16`` computes with a Keras mixed-precision
  copy of the model (bfloat16 compute, float32 weights).
- ``openvino``: the artifact's stored OpenVINO IR (``--engines openvino``, or
  the INT8 model of ``beamvision optimize``), else the Keras model converted
  (``openvino.convert_model`` on the traced function, on the worker),
  compiled for the CPU with the precision as its inference hint; top-k in NumPy.

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
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from beamvision.models.artifact import EMBEDDING, PROBABILITIES
from beamvision.models.metrics import DEFAULT_THRESHOLD  # a label's threshold where the manifest gives none

if TYPE_CHECKING:  # the engines' libraries are imported where a model is built
    import openvino as ov

    from beamvision.models.artifact import Artifact, Manifest

AUTO_PRECISION = "auto"  # --precision: bf16 where the CPU computes it natively, else fp32
_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
_EXACT_INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # 8-bit products summed in 32 bits


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Top-k classes of one image, best first, and its embedding if asked for.

    ``chosen``: of a multi-label model, every class whose score is at or above
    its threshold, best first (may be empty); None for a single-label model.
    """

    labels: list[str]
    scores: list[float]
    embedding: list[float] | None = None
    chosen: list[str] | None = None


def class_thresholds(manifest: Manifest, threshold: float | None = None) -> np.ndarray | None:
    """Each class's threshold, in label order, for a multi-label model; None for a single-label one.

    ``threshold`` (``classify --threshold``) replaces every class's own.
    """
    if not manifest.multi_label:
        return None
    if threshold is not None:
        return np.full(len(manifest.labels), threshold, dtype=np.float32)
    given = manifest.thresholds
    return np.asarray([given.get(label, DEFAULT_THRESHOLD) for label in manifest.labels], dtype=np.float32)


def chosen_labels(labels: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray) -> list[list[str]]:
    """Per image, the labels whose probability is at or above their threshold, best first."""
    chosen = []
    for row in probabilities:
        order = np.argsort(-row, kind="stable")
        chosen.append([str(labels[i]) for i in order if row[i] >= thresholds[i]])
    return chosen


def _cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """This x86 CPU's feature flags, from ``/proc/cpuinfo`` (or its text); empty where it has none."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return set()
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return flags


def native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX), from ``/proc/cpuinfo``."""
    return any(flag in _cpu_flags(cpuinfo) for flag in _BF16_CPU_FLAGS)


def saturating_int8(cpuinfo: str | None = None) -> bool:
    """Whether this CPU's INT8 kernels add uint8 x int8 products in saturating 16-bit pairs.

    x86 without VNNI or AMX does (VPMADDUBSW): there two products of full-range
    int8 weights can overflow, which 7-bit weights (``optimize --overflow_fix
    enable``) cannot.
    """
    flags = _cpu_flags(cpuinfo)
    return "sse4_1" in flags and not any(flag in flags for flag in _EXACT_INT8_CPU_FLAGS)


def resolve_precision(precision: str, cpuinfo: str | None = None) -> str:
    """``fp32`` or ``bf16`` for a ``--precision`` value (``auto`` follows the CPU)."""
    if precision == AUTO_PRECISION:
        return "bf16" if native_bf16(cpuinfo) else "fp32"
    return precision


def inference_function(artifact, batch_size: int | None, embeddings: bool):
    """The artifact's model as a ``tf.function`` on uint8 batches of ``batch_size`` (None: any).

    It returns ``probabilities`` and, with ``embeddings``, ``embedding`` (the pooled features).
    """
    import keras
    import tensorflow as tf

    manifest = artifact.manifest
    outputs = [artifact.model.output]
    if embeddings and manifest.classifier_layer:  # (an imported SavedModel's layers are hidden)
        features = artifact.model.get_layer(manifest.classifier_layer).input
        if len(features.shape) == 4:
            features = keras.layers.GlobalAveragePooling2D(name="embedding_pool")(features)
        outputs.append(features)
    model = keras.Model(artifact.model.inputs, outputs)
    size = manifest.input_size

    @tf.function(input_signature=[tf.TensorSpec([batch_size, size, size, 3], tf.uint8)])
    def predict(images):
        result = model(images, training=False)
        probabilities, *rest = result if isinstance(result, (list, tuple)) else [result]
        return {PROBABILITIES: probabilities, **({EMBEDDING: rest[0]} if rest else {})}

    return predict


class Engine:
    """An inference engine: what it stores in an artifact, what it runs, and how it computes a batch.

    A subclass sets the class attributes, implements ``__init__`` (from a
    loaded artifact) and ``__call__`` (a batch to Predictions), and, if it
    stores a converted model, ``convert``. Defining it registers it in
    ``ENGINES`` under ``name``, in the order of definition.

    Attributes:
        name: what ``--engine`` takes.
        title: the engine's name in messages.
        precisions: what it computes in (``--precision`` resolved).
        files: its converted model's files, as named in an artifact (empty:
            it stores none, and loads ``model.keras``).
        runs_int8: whether it runs the INT8 model of a quantised artifact.
        runs_on_nvidia_gpu: whether it computes on a worker's NVIDIA GPU (Dataflow's accelerators).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16")
    files: ClassVar[tuple[str, ...]] = ()
    runs_int8: ClassVar[bool] = False
    runs_on_nvidia_gpu: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        ENGINES[cls.name] = cls

    @classmethod
    def holds(cls, manifest: Manifest) -> bool:
        """Whether the artifact stores this engine's converted model (``--engines NAME``)."""
        return bool(cls.files) and all(name in manifest.files for name in cls.files)

    @classmethod
    def needs_keras(cls, manifest: Manifest) -> bool:
        """Whether loading the artifact for this engine needs Keras and its ``model.keras``."""
        return not cls.holds(manifest)

    @classmethod
    def refusal(cls, uri: str, manifest: Manifest) -> str | None:
        """Why this engine cannot run the artifact at ``uri``, or None when it can."""
        if not manifest.quantization or cls.runs_int8:
            return None
        # Its model.keras is the float source: this engine would silently run that, not the INT8 model.
        int8 = next(engine for engine in ENGINES.values() if engine.runs_int8)
        return (
            f"--engine {cls.name}: {uri} holds an INT8 model for {int8.title} "
            f"(beamvision optimize); use --engine {int8.name}"
        )

    @classmethod
    def convert(cls, artifact: Artifact, folder: str) -> dict[str, str]:
        """Writes the converted model into ``folder``; returns ``save_artifact``'s ``extra_files`` for it."""
        raise NotImplementedError(f"the {cls.name} engine stores no converted model")

    @staticmethod
    def before_load(threads: int | None) -> None:
        """Process-wide set-up that must precede loading the artifact (nothing, unless overridden)."""

    def __init__(
        self,
        artifact: Artifact,
        batch_size: int,
        top_k: int,
        embeddings: bool,
        precision: str = "fp32",
        threads: int | None = None,
        thresholds: np.ndarray | None = None,
    ):
        """The engine's model for ``artifact``, computing batches of ``batch_size`` at ``precision``.

        Args:
            artifact: the loaded artifact (its ``model`` is None where ``needs_keras`` said no).
            batch_size: the fixed batch shape; shorter batches are padded.
            top_k: classes per image (at most the model's).
            embeddings: also return each image's pooled features.
            precision: one of ``precisions`` (``--precision`` resolved).
            threads: how many threads compute (None: the engine's default, every core).
            thresholds: a multi-label model's per-class thresholds (``class_thresholds``);
                each Prediction's ``chosen`` is then set.

        Raises:
            ValueError: the engine does not compute in ``precision``.
        """
        if precision not in self.precisions:
            raise ValueError(
                f"the {self.name} engine computes in {', '.join(self.precisions)}; "
                f"Received: precision={precision}"
            )
        self.batch_size = batch_size
        self.labels = np.asarray(artifact.manifest.labels, dtype=object)
        self.k = min(top_k, len(self.labels))
        self.thresholds = thresholds

    def __call__(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        raise NotImplementedError

    def _batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Pads a short batch to the fixed shape (the compiled model is traced once)."""
        batch = np.zeros((self.batch_size, *images[0].shape), dtype=np.uint8)
        batch[: len(images)] = np.stack(images)
        return batch

    def _predictions(self, count: int, scores, indices, embedding, probabilities=None) -> list[Prediction]:
        """Predictions of the first ``count`` images; ``probabilities`` (every class) for ``chosen``."""
        chosen = (
            chosen_labels(self.labels, probabilities[:count], self.thresholds)
            if self.thresholds is not None
            else [None] * count
        )
        return [
            Prediction(
                labels=self.labels[indices[i]].tolist(),
                scores=scores[i].tolist(),
                embedding=None if embedding is None else embedding[i].tolist(),
                chosen=chosen[i],
            )
            for i in range(count)
        ]


ENGINES: dict[str, type[Engine]] = {}  # --engine NAME -> its class, filled as each is defined


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


class TensorFlowEngine(Engine):
    """The Keras model as one compiled graph, top-k inside it."""

    name = "tensorflow"
    title = "TensorFlow"
    runs_on_nvidia_gpu = True  # with CUDA TensorFlow (deploy/Dockerfile.gpu), on the first GPU it sees
    # Loading the Keras model starts TensorFlow's runtime, which fixes its pools.
    before_load = staticmethod(set_tensorflow_threads)

    def __init__(
        self,
        artifact: Artifact,
        batch_size: int,
        top_k: int,
        embeddings: bool,
        precision: str = "fp32",
        threads: int | None = None,  # (TensorFlow's pools are sized in before_load, before the model)
        thresholds: np.ndarray | None = None,
    ):
        import tensorflow as tf

        super().__init__(artifact, batch_size, top_k, embeddings, precision, threads, thresholds)
        if precision == "bf16":
            artifact = dataclasses.replace(artifact, model=_mixed_bfloat16(artifact.model))
        predict = inference_function(artifact, batch_size, embeddings)
        k, every = self.k, thresholds is not None

        @tf.function(input_signature=predict.input_signature)
        def top(images):
            out = predict(images)
            probabilities = tf.cast(out[PROBABILITIES], tf.float32)
            best = tf.math.top_k(probabilities, k=k)
            extra = [tf.cast(out[EMBEDDING], tf.float32)] if EMBEDDING in out else []
            return [best.values, best.indices, probabilities if every else best.values, *extra]

        self._predict = top

    def __call__(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        scores, indices, probabilities, *embedding = (t.numpy() for t in self._predict(self._batch(images)))
        embedding = embedding[0] if embedding else None
        return self._predictions(len(images), scores, indices, embedding, probabilities)


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


class OpenVINOEngine(Engine):
    """The artifact's OpenVINO model (stored, or converted from Keras), compiled at the given precision."""

    name = "openvino"
    title = "OpenVINO"
    xml = "openvino/model.xml"  # the model's graph
    weights = "openvino/model.bin"  # its weights, read beside the graph under the same name
    files = (xml, weights)
    runs_int8 = True  # beamvision optimize stores its INT8 model as this engine's files
    # (Its GPU plugin is for Intel GPUs: on an NVIDIA worker it computes on the CPU.)

    @classmethod
    def convert(cls, artifact: Artifact, folder: str) -> dict[str, str]:
        """The artifact's Keras model as OpenVINO IR in ``folder``: any batch size, with the embedding."""
        import openvino as ov

        return cls.save(ov.convert_model(inference_function(artifact, None, embeddings=True)), folder)

    @classmethod
    def save(cls, model: ov.Model, folder: str) -> dict[str, str]:
        """Writes an OpenVINO model into ``folder``: ``save_artifact``'s ``extra_files`` for it.

        Float constants are saved as fp16 (OpenVINO's default), as conversion saves them.
        """
        import openvino as ov

        os.makedirs(folder, exist_ok=True)
        xml = os.path.join(folder, "model.xml")
        ov.save_model(model, xml)
        return {cls.xml: xml, cls.weights: os.path.join(folder, "model.bin")}

    @classmethod
    def local_files(cls, artifact: Artifact, folder: str) -> dict[str, str]:
        """The artifact's OpenVINO model as local files in ``folder``: its stored copy, else converted."""
        from beamvision.models.artifact import fetch_file

        if not cls.holds(artifact.manifest):
            return cls.convert(artifact, folder)
        os.makedirs(folder, exist_ok=True)
        return {name: fetch_file(artifact.uri, artifact.manifest, name, folder) for name in cls.files}

    @staticmethod
    def compile(model: ov.Model, precision: str, threads: int | None = None):
        """An OpenVINO model compiled for the CPU, computing at ``precision`` on ``threads`` (None: all)."""
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision]}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        return ov.Core().compile_model(model, "CPU", config)

    @classmethod
    def _model(cls, artifact: Artifact, batch_size: int, embeddings: bool) -> ov.Model:
        """The OpenVINO model: the artifact's (converted at export or train), else converted now."""
        import openvino as ov

        if not cls.holds(artifact.manifest):
            logging.getLogger("beamvision").info("no OpenVINO model in %s: converting it", artifact.uri)
            return ov.convert_model(inference_function(artifact, batch_size, embeddings))
        with tempfile.TemporaryDirectory() as tmp:
            model = ov.Core().read_model(cls.local_files(artifact, tmp)[cls.xml])
        size = artifact.manifest.input_size
        model.reshape([batch_size, size, size, 3])  # a fixed shape compiles to the fastest kernels
        return model

    def __init__(
        self,
        artifact: Artifact,
        batch_size: int,
        top_k: int,
        embeddings: bool,
        precision: str = "fp32",
        threads: int | None = None,
        thresholds: np.ndarray | None = None,
    ):
        super().__init__(artifact, batch_size, top_k, embeddings, precision, threads, thresholds)
        _warn_if_int8_saturates(artifact)
        self._compiled = self.compile(self._model(artifact, batch_size, embeddings), precision, threads)
        self._probabilities = self._compiled.output(PROBABILITIES)
        self._embedding = self._compiled.output(EMBEDDING) if embeddings else None
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
        return self._predictions(len(images), scores, indices, embedding, probabilities)


def _warn_if_int8_saturates(artifact: Artifact) -> None:
    """A warning where this CPU would compute an INT8 model other than the one optimize measured."""
    from beamvision.models.quantization import SATURATION_FREE, overflow_fix

    record = artifact.manifest.quantization
    if record and overflow_fix(record) != SATURATION_FREE and saturating_int8():
        logging.getLogger("beamvision").warning(
            "%s: its INT8 weights take the full 8 bits (NNCF's overflow fix: %s) and this CPU has no "
            "VNNI, so its sums can saturate: labels may differ from the accuracy optimize measured; "
            "quantise it again with optimize --overflow_fix %s",
            artifact.uri,
            overflow_fix(record),
            SATURATION_FREE,
        )


DEFAULT_ENGINE = TensorFlowEngine.name
# --precision: auto, then what the engines compute in.
PRECISIONS = (AUTO_PRECISION, *dict.fromkeys(p for engine in ENGINES.values() for p in engine.precisions))
GPU_ENGINES = tuple(name for name, engine in ENGINES.items() if engine.runs_on_nvidia_gpu)
# Engines whose converted model an artifact can store (export and train --engines).
CONVERTED_ENGINES = tuple(name for name, engine in ENGINES.items() if engine.files)


def engine_files(model, manifest: Manifest, engines, folder: str) -> dict[str, str]:
    """Converted models for the ``engines`` named, under ``folder``: ``save_artifact``'s ``extra_files``."""
    from beamvision.models.artifact import Artifact

    artifact = Artifact(uri=folder, model=model, manifest=manifest)
    files = {}
    for name in engines:
        files.update(ENGINES[name].convert(artifact, os.path.join(folder, name)))
    return files


def build_classifier(
    engine: str,
    artifact: Artifact,
    batch_size: int,
    top_k: int,
    embeddings: bool,
    precision: str,
    threads: int | None = None,
    threshold: float | None = None,
) -> Engine:
    """The classifier of ``engine`` for a loaded artifact; ``precision`` as ``--precision`` gives it.

    ``threads``: how many threads compute (None: the engine's default, every core).
    ``threshold``: ``--threshold``, every class's threshold of a multi-label model (None: its own).
    """
    resolved = resolve_precision(precision)
    logging.getLogger("beamvision").info(
        "inference engine %s at %s on %s threads", engine, resolved, threads or "all"
    )
    thresholds = class_thresholds(artifact.manifest, threshold)
    return ENGINES[engine](artifact, batch_size, top_k, embeddings, resolved, threads, thresholds)


def load_for_engine(model_uri: str, engine: str, threads: int | None = None) -> Artifact:
    """The artifact at ``model_uri`` as ``engine`` needs it: what a classify worker and serve load.

    The engine's process set-up comes first (``before_load``); an engine that
    runs the artifact's stored converted model never loads Keras.
    """
    from beamvision.models.artifact import Artifact, load_artifact, load_manifest

    ENGINES[engine].before_load(threads)
    manifest = load_manifest(model_uri)
    if ENGINES[engine].needs_keras(manifest):
        return load_artifact(model_uri)
    return Artifact(model_uri, None, manifest)  # its converted model is all the engine needs
