"""Serving formats: a model artifact converted for TF Serving and Vertex AI, phones, and ONNX runtimes.

A format is one ``ServingFormat`` subclass, and defining it registers it in
``FORMATS`` (its ``name`` is what ``beamvision convert --format`` takes). The
class owns all that is known of the format: what it writes into the output
folder (``write``), whether it quantises (``quantizations``), what it is fed
(``takes``: the image file's bytes, or uint8 pixels at the model's size as an
app resizes them) and how a converted model is run to check it (``load``).

- ``savedmodel``: TF Serving's layout, ``OUT/1/``: a ``serving_default``
  signature taking a batch of encoded images (``image_bytes``, tf.string: what
  TF Serving and Vertex AI receive as base64 in JSON), decoded and resized in
  the graph as ``classify`` decodes (``decode_in_graph``), returning
  ``probabilities``, the top ``label`` and its ``score``, and ``labels`` (the
  label list, one row per image).
- ``tflite``: ``OUT/model.tflite`` (LiteRT, for Android and iOS) taking uint8
  pixels [1, size, size, 3]; float, or with ``--quantize int8`` weights and
  activations in INT8 calibrated on prepare's training images (input uint8,
  output float32 probabilities).
- ``onnx``: ``OUT/model.onnx`` (Keras' own export, with tf2onnx), uint8 pixels
  [batch, size, size, 3] in, probabilities out.

Every format writes ``OUT/labels.txt`` (one label a line, index i naming
output i) beside its model, and ``convert`` writes ``OUT/conversion.json``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:  # TensorFlow is imported where a model is converted or run
    from beamvision.models.artifact import Artifact

LABELS_FILE = "labels.txt"
REPORT_FILE = "conversion.json"
BYTES = "bytes"  # ServingFormat.takes: the encoded image file
PIXELS = "pixels"  # ServingFormat.takes: uint8 pixels at the model's input size
NO_QUANTIZATION = "none"
# JPEG's DCT can decode at 1/2, 1/4 or 1/8 of full size: what Pillow's draft mode does in classify.
_JPEG_RATIOS = (1, 2, 4, 8)

# A converted model run on a batch: encoded images or pixels in, probabilities [n, classes] out.
Predictor = Callable[[Sequence], np.ndarray]


class ServingFormat:
    """A format an artifact converts to: what it writes, what it takes, how to run it.

    Attributes:
        name: what ``--format`` takes.
        title: the format's name in messages.
        takes: ``BYTES`` (encoded image files) or ``PIXELS`` (uint8 at model size).
        quantizations: what ``--quantize`` may be for it (the first is the default).
        model_file: the model's path inside the output folder.
        batch: the model's fixed batch size (None: any).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    takes: ClassVar[str] = PIXELS
    quantizations: ClassVar[tuple[str, ...]] = (NO_QUANTIZATION,)
    model_file: ClassVar[str]
    batch: ClassVar[int | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        FORMATS[cls.name] = cls

    @classmethod
    def write(cls, artifact: Artifact, folder: str, calibration: np.ndarray | None = None) -> None:
        """Writes the converted model into the local ``folder`` (``calibration``: uint8 images, for INT8)."""
        raise NotImplementedError

    @classmethod
    def load(cls, folder: str, threads: int | None = None) -> Predictor:
        """The converted model in ``folder`` as a function of a batch (of what ``takes`` says)."""
        raise NotImplementedError

    @classmethod
    def signature(cls, input_size: int) -> dict:
        """What the model takes and returns, for conversion.json and the docs."""
        shape = [cls.batch, input_size, input_size, 3]
        return {"input": {"name": "pixels", "dtype": "uint8", "shape": shape}, "outputs": ["probabilities"]}


FORMATS: dict[str, type[ServingFormat]] = {}  # --format NAME -> its class, filled as each is defined


def write_labels(labels: Sequence[str], folder: str) -> str:
    """``labels.txt`` in ``folder``: one label a line, in output order; returns its path."""
    path = os.path.join(folder, LABELS_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{label}\n" for label in labels)
    return path


def pixel_signature(input_size: int, batch: int | None):
    """The TensorSpec of uint8 pixels at the model's size (``batch`` None: any batch size)."""
    import tensorflow as tf

    return tf.TensorSpec([batch, input_size, input_size, 3], tf.uint8, name="pixels")


def decode_in_graph(data, size: int):
    """One encoded image to uint8 RGB pixels of ``size`` x ``size``, in TensorFlow ops, as classify decodes.

    classify's ``decode_image`` (Pillow) and this agree on: JPEG decoded at the
    smallest DCT scale still at least ``size`` on both sides (Pillow's draft
    mode; libjpeg's accurate integer DCT, as Pillow's), grey to RGB, alpha
    composited on white, the whole image resized to ``size`` x ``size``
    (aspect ratio not kept, nothing cropped) with an antialiased bilinear
    filter, rounded to uint8. They differ where TensorFlow has no decoder
    option: EXIF orientation is not applied, TIFF is not read, and Pillow's
    fixed-point filter rounds a little differently (``convert`` measures the
    agreement on real photos).
    """
    import tensorflow as tf

    def jpeg():
        height, width = tf.unstack(tf.image.extract_jpeg_shape(data)[:2])
        scale = tf.minimum(height // size, width // size)
        # The largest ratio the image still covers: index 3 for 8, ... 0 for 1 (as Pillow's draft picks).
        index = tf.reduce_sum(tf.cast(scale >= tf.constant(_JPEG_RATIOS[1:]), tf.int32))
        return tf.switch_case(
            index,
            [
                lambda ratio=ratio: tf.io.decode_jpeg(
                    data, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE"
                )
                for ratio in _JPEG_RATIOS
            ],
        )

    def other():
        image = tf.io.decode_image(data, expand_animations=False)  # native channels, 16-bit scaled to 8
        channels = tf.shape(image)[-1]
        rgb = tf.cond(channels < 3, lambda: tf.image.grayscale_to_rgb(image[..., :1]), lambda: image[..., :3])
        has_alpha = tf.equal(channels % 2, 0)  # LA or RGBA
        alpha = tf.cond(
            has_alpha,
            lambda: tf.cast(image[..., -1:], tf.float32) / 255.0,
            lambda: tf.ones_like(tf.cast(image[..., :1], tf.float32)),
        )
        white = 255.0 * (1.0 - alpha)
        return tf.cast(tf.round(tf.cast(rgb, tf.float32) * alpha + white), tf.uint8)

    image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    image.set_shape([None, None, 3])
    resized = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


class SavedModelFormat(ServingFormat):
    """TF Serving's layout: ``OUT/1/`` with a ``serving_default`` signature on encoded image bytes."""

    name = "savedmodel"
    title = "SavedModel"
    takes = BYTES
    model_file = "1"  # TF Serving loads the highest numbered folder: this is version 1
    input_name = "image_bytes"  # a *_bytes input: JSON clients send {"b64": ...}

    @classmethod
    def write(cls, artifact: Artifact, folder: str, calibration: np.ndarray | None = None) -> None:
        import tensorflow as tf

        size, labels = artifact.manifest.input_size, list(artifact.manifest.labels)
        model = artifact.model
        module = tf.Module()
        module.model = model
        module.label_list = tf.constant(labels)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=cls.input_name)])
        def serve(image_bytes):
            images = tf.map_fn(
                lambda data: decode_in_graph(data, size),
                image_bytes,
                fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8),
            )
            probabilities = tf.cast(model(images, training=False), tf.float32)
            best = tf.argmax(probabilities, axis=1, output_type=tf.int32)
            count = tf.shape(image_bytes)[0]
            return {
                "probabilities": probabilities,
                "label": tf.gather(module.label_list, best),
                "score": tf.reduce_max(probabilities, axis=1),
                "labels": tf.tile(module.label_list[None], [count, 1]),
            }

        module.serve = serve
        tf.saved_model.save(
            module, os.path.join(folder, cls.model_file), signatures={"serving_default": serve}
        )

    @classmethod
    def load(cls, folder: str, threads: int | None = None) -> Predictor:
        import tensorflow as tf

        serve = tf.saved_model.load(os.path.join(folder, cls.model_file)).signatures["serving_default"]

        def predict(files: Sequence[bytes]) -> np.ndarray:
            return serve(**{cls.input_name: tf.constant(list(files))})["probabilities"].numpy()

        return predict

    @classmethod
    def signature(cls, input_size: int) -> dict:
        return {
            "signature": "serving_default",
            "input": {"name": cls.input_name, "dtype": "string", "shape": [None]},
            "outputs": ["probabilities", "label", "score", "labels"],
        }


class TFLiteFormat(ServingFormat):
    """LiteRT (TensorFlow Lite) for phones: uint8 pixels of one image in, float probabilities out."""

    name = "tflite"
    title = "TFLite"
    quantizations = (NO_QUANTIZATION, "int8")
    model_file = "model.tflite"
    batch = 1  # one image a call, as on a phone

    @classmethod
    def write(cls, artifact: Artifact, folder: str, calibration: np.ndarray | None = None) -> None:
        import tensorflow as tf

        size = artifact.manifest.input_size
        options = {}
        if calibration is not None:  # full INT8: weights and activations, the input left uint8

            def representative():
                for image in calibration:
                    yield [image[None]]

            options = {
                "optimizations": [tf.lite.Optimize.DEFAULT],
                "representative_dataset": representative,
                "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
                "inference_input_type": tf.uint8,
            }
        artifact.model.export(
            os.path.join(folder, cls.model_file),
            format="litert",
            input_signature=[pixel_signature(size, cls.batch)],
            verbose=False,
            **options,
        )

    @classmethod
    def load(cls, folder: str, threads: int | None = None) -> Predictor:
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=os.path.join(folder, cls.model_file), num_threads=threads)
        interpreter.allocate_tensors()
        given, returned = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]

        def predict(images: Sequence[np.ndarray]) -> np.ndarray:
            rows = []
            for image in images:  # the model's batch is one image, as on a phone
                interpreter.set_tensor(given, image[None])
                interpreter.invoke()
                rows.append(_dequantized(interpreter.get_tensor(returned["index"]), returned)[0])
            return np.stack(rows)

        return predict


def _dequantized(values: np.ndarray, details: dict) -> np.ndarray:
    """A LiteRT output as float32 (a quantised output scaled back by its scale and zero point)."""
    scale, zero_point = details.get("quantization", (0.0, 0))
    if values.dtype == np.float32 or not scale:
        return values.astype(np.float32)
    return (values.astype(np.float32) - zero_point) * scale


class ONNXFormat(ServingFormat):
    """ONNX (Keras' export, with tf2onnx): uint8 pixels of any batch in, probabilities out."""

    name = "onnx"
    title = "ONNX"
    model_file = "model.onnx"

    @classmethod
    def write(cls, artifact: Artifact, folder: str, calibration: np.ndarray | None = None) -> None:
        size = artifact.manifest.input_size
        artifact.model.export(
            os.path.join(folder, cls.model_file),
            format="onnx",
            input_signature=[pixel_signature(size, cls.batch)],
            verbose=False,
        )

    @classmethod
    def load(cls, folder: str, threads: int | None = None) -> Predictor:
        import openvino as ov  # reads ONNX itself: the check needs no other runtime

        config = {
            "INFERENCE_PRECISION_HINT": "f32",
            **({"INFERENCE_NUM_THREADS": threads} if threads else {}),
        }
        compiled = ov.Core().compile_model(os.path.join(folder, cls.model_file), "CPU", config)

        def predict(images: Sequence[np.ndarray]) -> np.ndarray:
            return np.asarray(compiled([np.stack(images)])[0], dtype=np.float32)

        return predict


def agreement(reference: np.ndarray, converted: np.ndarray) -> dict:
    """How far a converted model's probabilities are from classify's on the same images.

    Returns the images compared, how many had the same top-1 label, that as a
    share, and the largest difference of any probability.
    """
    if not len(reference):
        return {"images": 0, "same_top1": 0, "top1_agreement": None, "max_abs_difference": None}
    same = int(np.sum(np.argmax(reference, axis=1) == np.argmax(converted, axis=1)))
    return {
        "images": len(reference),
        "same_top1": same,
        "top1_agreement": round(same / len(reference), 4),
        "max_abs_difference": round(float(np.max(np.abs(reference - converted))), 4),
    }


def folder_bytes(folder: str) -> int:
    """Bytes of every file under ``folder``: a converted model's size on disk."""
    return sum(
        os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names
    )
