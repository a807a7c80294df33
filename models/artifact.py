"""The beamvision model artifact: a directory that ``classify`` can run.

Layout (local path or any Beam filesystem URI such as ``gs://``)::

    DIR/model.keras     uint8 images [batch, H, W, 3] in, probabilities out,
                        the architecture's normalisation inside the graph
    DIR/manifest.json   what the model is (see ``Manifest``)
    DIR/...             optionally, an engine's converted model (``export`` and
                        ``train --engines``; which files, ``transforms.engines``
                        knows), listed in the manifest like model.keras

``manifest.json`` is written last and records the size and SHA-256 of
``model.keras``: it is the commit point, so a reader sees either no artifact or
a complete one. ``verify_artifact`` checks an artifact without building its
model (what a launcher does); ``load_artifact`` validates everything and loads
the Keras model in safe mode only (no arbitrary code runs).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
import zipfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Keras is imported where a model is built or loaded
    import keras

from beamvision import __version__, storage
from beamvision.models.errors import ArtifactError, one_line
from beamvision.models.registry import get_spec, head_activation

SCHEMA_VERSION = 1
MODEL_FILE = "model.keras"
MANIFEST_FILE = "manifest.json"
# The architecture of a model that ``beamvision import`` brought in: none of the registry's.
IMPORTED = "imported"
# An imported SavedModel: the format's name in ``origin``, and the folder of its files in the artifact.
SAVEDMODEL = SAVEDMODEL_DIR = "savedmodel"
# The outputs of the inference function and of the converted models an artifact stores, by name:
# every class's probability (what the engines rank labels by), and the pooled features.
PROBABILITIES, EMBEDDING = "probabilities", "embedding"


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The content of ``manifest.json``.

    Attributes:
        name: model name shown in results (defaults to the architecture).
        version: model version shown in results (defaults to the creation time).
        architecture: registry name of the architecture, or ``imported`` for
            a user's own model (``beamvision import``; see ``origin``).
        input_size: square input side in pixels.
        preprocessing: normalisation mode inside the graph.
        labels: class names, index i naming output i.
        weights: where the weights came from: ``imagenet``, ``none``
            (random initialisation), ``file:URI`` or ``trained``.
        created_at: ISO 8601 UTC time of export.
        library_versions: versions of the libraries that wrote the artifact.
        training: training configuration (empty when not trained here).
        metrics: evaluation metrics (empty when not evaluated).
        files: ``{"model.keras": {"bytes": N, "sha256": HEX}}``.
        schema_version: version of this manifest format.
        quantization: how the stored converted model was quantised (``beamvision
            optimize``: method, calibration, accuracy); empty for a float model,
            and then left out of ``manifest.json``. A quantised artifact's
            ``model.keras`` is still its float source, so that the artifact
            stays valid: only an engine that runs INT8 runs the quantised model.
        multi_label: the model scores each class independently (sigmoid head):
            an image may hold several labels. False (softmax, one label) is
            left out of ``manifest.json``.
        thresholds: label -> the score at or above which a multi-label model
            predicts that label (chosen on the validation split); empty for a
            single-label model, and then left out of ``manifest.json``.
        origin: where an imported model came from: ``uri``, ``format``,
            ``sha256`` and ``bytes`` of the file imported, its ``output``
            (softmax, sigmoid or logits) and its ``classifier_layer``; empty
            for the registry's architectures, and then left out.
    """

    name: str
    version: str
    architecture: str
    input_size: int
    preprocessing: str
    labels: list[str]
    weights: str
    created_at: str
    library_versions: dict[str, str]
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    quantization: dict[str, Any] = dataclasses.field(default_factory=dict)
    multi_label: bool = False
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    origin: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def classifier_layer(self) -> str | None:
        """The model's final classifying layer: its input, pooled, is the image embedding.

        None for an imported SavedModel, whose layers are hidden behind its signature.
        """
        if self.architecture == IMPORTED:
            return self.origin["classifier_layer"]
        return get_spec(self.architecture).classifier_layer

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        if not data["quantization"]:  # a float artifact stays readable by a beamvision without the field
            del data["quantization"]
        for optional in ("multi_label", "thresholds", "origin"):  # such manifests are written as before
            if not data[optional]:
                del data[optional]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """Parses and validates manifest JSON; ``where`` names it in errors."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ArtifactError(f"{where} must hold a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(
                f"{where} has schema_version {version!r}; this beamvision reads {SCHEMA_VERSION}"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = sorted(
            n
            for n, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in data
        )
        if missing:
            raise ArtifactError(f"{where} lacks required fields: {', '.join(missing)}")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ArtifactError(f"{where} has unknown fields: {', '.join(unknown)}")
        manifest = cls(**data)
        labels = manifest.labels
        if not (isinstance(labels, list) and labels and all(isinstance(x, str) and x for x in labels)):
            raise ArtifactError(f"{where}: labels must be a non-empty list of non-empty strings")
        if len(set(labels)) != len(labels):
            raise ArtifactError(f"{where}: labels must be unique")
        if not isinstance(manifest.input_size, int) or manifest.input_size < 1:
            raise ArtifactError(f"{where}: input_size must be a positive integer")
        if not isinstance(manifest.multi_label, bool):
            raise ArtifactError(f"{where}: multi_label must be true or false")
        thresholds = manifest.thresholds
        if not (
            isinstance(thresholds, dict)
            and set(thresholds) <= set(labels)
            and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in thresholds.values())
        ):
            raise ArtifactError(f"{where}: thresholds must map labels to scores between 0 and 1")
        if thresholds and not manifest.multi_label:
            raise ArtifactError(f"{where}: thresholds are only for a multi_label model")
        if (manifest.architecture == IMPORTED) != bool(manifest.origin):
            raise ArtifactError(f"{where}: origin is recorded for an imported model, and only for one")
        if manifest.origin and not isinstance(manifest.origin.get("classifier_layer", 0), (str, type(None))):
            raise ArtifactError(f"{where}: origin must name the model's classifier_layer (or null)")
        return manifest


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A loaded, validated model artifact (``model`` is None where an engine uses its converted copy)."""

    uri: str
    model: keras.Model | None
    manifest: Manifest


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a model artifact."""
    import keras
    import tensorflow as tf

    return {
        "beamvision": __version__,
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "apache_beam": importlib.metadata.version("apache-beam"),  # its version, without importing Beam
        "python": platform.python_version(),
    }


def new_manifest(
    model: keras.Model,
    architecture: str,
    labels: list[str],
    weights: str,
    name: str | None = None,
    version: str | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    preprocessing: str | None = None,
) -> Manifest:
    """A manifest for ``model``, as built by ``create_model(architecture, ...)``.

    ``preprocessing``: the normalisation inside the model, by default the architecture's.
    """
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return Manifest(
        name=name or architecture,
        version=version or now.strftime("%Y%m%dT%H%M%SZ"),
        architecture=architecture,
        input_size=int(model.input_shape[1]),
        preprocessing=preprocessing or get_spec(architecture).preprocessing,
        labels=list(labels),
        weights=weights,
        created_at=now.isoformat(),
        library_versions=library_versions(),
        training=training or {},
        metrics=metrics or {},
    )


def save_artifact(
    model: keras.Model,
    manifest: Manifest,
    uri: str,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Manifest:
    """Writes ``model`` and ``manifest`` as an artifact directory at ``uri``.

    ``extra_files``: name in the artifact -> local path, written beside the
    model and recorded (size, SHA-256) in the manifest, such as an engine's
    converted model (``openvino/model.xml``: see ``transforms.engines``).

    Returns:
        The manifest as written, with the ``files`` section filled in.

    Raises:
        ArtifactError: if an artifact exists at ``uri`` and ``overwrite`` is False,
            or the label count differs from the model's output size.
    """
    if int(model.output_shape[-1]) != manifest.num_classes:
        raise ArtifactError(
            f"model has {model.output_shape[-1]} outputs but the manifest has {manifest.num_classes} labels"
        )
    check_free(uri, overwrite)
    manifest_uri = storage.join(uri, MANIFEST_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        local_model = os.path.join(tmp, MODEL_FILE)
        model.save(local_model)
        local = {MODEL_FILE: local_model, **(extra_files or {})}
        files = {
            name: {"bytes": os.path.getsize(path), "sha256": storage.sha256_file(path)}
            for name, path in local.items()
        }
        manifest = dataclasses.replace(manifest, files=files)
        if storage.exists(manifest_uri):
            # Retract the old commit point first: a reader must never pair the
            # old manifest with the new model file.
            storage.delete(manifest_uri)
        for name, path in local.items():
            storage.write_atomic(storage.join(uri, *name.split("/")), local_path=path)
    storage.write_atomic(manifest_uri, manifest.to_json().encode("utf-8"))
    return manifest


def load_manifest(uri: str) -> Manifest:
    """Reads and validates the manifest of the artifact at ``uri``.

    Raises:
        ArtifactError: one line saying what is wrong.
    """
    manifest_uri = storage.join(uri, MANIFEST_FILE)
    if not storage.exists(manifest_uri):
        if storage.exists(storage.join(uri, MODEL_FILE)):
            raise ArtifactError(
                f"incomplete model artifact at {uri}: {MODEL_FILE} without {MANIFEST_FILE} "
                "(still being written, or the write failed)"
            )
        raise ArtifactError(f"no model artifact at {uri}: {MANIFEST_FILE} not found")
    manifest = Manifest.from_json(storage.read_text(manifest_uri), manifest_uri)
    if MODEL_FILE not in manifest.files:
        raise ArtifactError(f"{manifest_uri} does not list {MODEL_FILE}")
    return manifest


def verify_artifact(uri: str) -> Manifest:
    """Validates the artifact at ``uri`` without building its model: what a launcher checks.

    Reads the manifest (schema version, fields, labels), checks that
    ``model.keras`` has the size and SHA-256 the manifest records, and reads the
    model's Keras config (never its code) for what safe mode would refuse, for
    the uint8 image input of the manifest's size and for one output per label.
    Workers then build the
    model with ``load_artifact``, in safe mode.

    Raises:
        ArtifactError: one line saying what is wrong.
    """
    manifest = load_manifest(uri)
    _check_other_files(uri, manifest)
    with tempfile.TemporaryDirectory() as tmp:
        config = _keras_config(fetch_file(uri, manifest, MODEL_FILE, tmp), storage.join(uri, MODEL_FILE))
    layers = list(_layers(config))
    if has_unsafe_layer(config):
        raise _unsafe(storage.join(uri, MODEL_FILE))
    classifier = manifest.classifier_layer
    outputs = [
        layer["config"].get("units") or layer["config"].get("filters")
        for layer in layers
        if classifier and isinstance(layer.get("config"), dict) and layer["config"].get("name") == classifier
    ]
    if outputs and outputs[-1] != manifest.num_classes:
        raise ArtifactError(
            f"model artifact at {uri} has {manifest.num_classes} labels "
            f"but its model has {outputs[-1]} outputs"
        )
    inputs = [layer for layer in layers if layer.get("class_name") == "InputLayer"]
    expected = [None, manifest.input_size, manifest.input_size, 3]
    received = [(x["config"].get("batch_shape"), x["config"].get("dtype")) for x in inputs[:1]]
    if received != [(expected, "uint8")]:
        raise ArtifactError(
            f"model artifact at {uri} must take uint8 images of shape {tuple(expected)}; "
            f"its model takes {received[0] if received else 'no image input'}"
        )
    return manifest


def load_artifact(uri: str) -> Artifact:
    """Loads and validates the artifact at ``uri`` (local or any Beam filesystem).

    Raises:
        ArtifactError: for a missing or partial directory, an unknown schema
            version, a model file that does not match the manifest, a model that
            needs unsafe deserialisation, or labels that do not match the model.
    """
    manifest = load_manifest(uri)
    model_uri = storage.join(uri, MODEL_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        local = fetch_file(uri, manifest, MODEL_FILE, tmp)  # checked against the manifest either way
        if manifest.origin.get("format") == SAVEDMODEL:
            model = _load_savedmodel(uri, manifest)
        else:
            model = _load_keras_safely(local, model_uri)
    _check_model_matches(model, manifest, uri)
    return Artifact(uri=uri, model=model, manifest=manifest)


def savedmodel_files(manifest: Manifest) -> list[str]:
    """The names of an imported SavedModel's files in its artifact (none for any other artifact)."""
    return [name for name in manifest.files if name.startswith(SAVEDMODEL_DIR + "/")]


def fetch_savedmodel(uri: str, manifest: Manifest, folder: str) -> dict[str, str]:
    """An imported SavedModel's files, checked, under ``folder``: name in the artifact -> local path."""
    local = {}
    for name in savedmodel_files(manifest):
        path = os.path.join(folder, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.replace(fetch_file(uri, manifest, name, folder), path)
        local[name] = path
    return local


def _load_savedmodel(uri: str, manifest: Manifest) -> keras.Model:
    """An imported SavedModel's wrapper, rebuilt around its files fetched to a local folder.

    model.keras holds the same wrapper, but its TFSMLayer names the folder it
    was imported from. The files are fetched (and checked) once per machine
    into a folder named by their SHA-256s, which outlives the process (TensorFlow
    may read them after loading) and which every later load, by any worker, reuses.
    """
    import hashlib

    from beamvision.models.importing import savedmodel_model

    names = savedmodel_files(manifest)
    digest = hashlib.sha256("".join(manifest.files[n]["sha256"] for n in sorted(names)).encode()).hexdigest()
    folder = os.path.join(tempfile.gettempdir(), f"beamvision-savedmodel-{digest[:24]}")
    if not os.path.isdir(folder):
        fetching = tempfile.mkdtemp(prefix="fetching-", dir=tempfile.gettempdir())
        fetch_savedmodel(uri, manifest, fetching)
        try:
            os.rename(fetching, folder)  # atomic: a folder there is complete
        except OSError:  # another process got there first: its copy is the same files
            shutil.rmtree(fetching, ignore_errors=True)
    origin = manifest.origin
    try:
        return savedmodel_model(
            os.path.join(folder, SAVEDMODEL_DIR),
            manifest.input_size,
            manifest.preprocessing,
            origin["output_key"],
            activation=head_activation(manifest.multi_label) if origin["output"] == "logits" else None,
        )
    except Exception as exc:  # TensorFlow raises many types for a folder it cannot load
        raise ArtifactError(f"cannot load the SavedModel in {uri}: {one_line(exc)}") from None


def fetch_file(uri: str, manifest: Manifest, name: str, tmp: str) -> str:
    """The local path of the artifact's file ``name``, copied into ``tmp`` and checked against the manifest.

    Raises:
        ArtifactError: the file is missing, or its size or SHA-256 is not what the manifest records.
    """
    file_uri = storage.join(uri, *name.split("/"))
    if not storage.exists(file_uri):
        raise ArtifactError(f"incomplete model artifact at {uri}: {name} not found")
    expected = manifest.files[name]
    local = os.path.join(tmp, name.replace("/", "_"))
    storage.download(file_uri, local)
    size, digest = os.path.getsize(local), storage.sha256_file(local)
    if size != expected.get("bytes") or digest != expected.get("sha256"):
        raise ArtifactError(
            f"{file_uri} does not match its manifest ({size} bytes, sha256 {digest[:12]}…; "
            f"expected {expected.get('bytes')} bytes, sha256 {str(expected.get('sha256'))[:12]}…)"
        )
    return local


def _check_other_files(uri: str, manifest: Manifest) -> None:
    """Every other file the manifest lists (an engine's converted model) exists with its recorded size."""
    for name, expected in manifest.files.items():
        if name == MODEL_FILE:
            continue
        file_uri = storage.join(uri, *name.split("/"))
        if not storage.exists(file_uri):
            raise ArtifactError(f"incomplete model artifact at {uri}: {name} not found")
        size = storage.size(file_uri)
        if size != expected.get("bytes"):
            raise ArtifactError(
                f"{file_uri} does not match its manifest ({size} bytes, expected {expected.get('bytes')})"
            )


def _keras_config(local_path: str, uri: str) -> dict[str, Any]:
    """The architecture config inside a .keras file (a zip), read as JSON."""
    try:
        with zipfile.ZipFile(local_path) as archive:
            return json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot load {uri}: not a Keras model file ({exc})") from None


# Layers that hold Python code: Keras's safe mode refuses them (a Lambda's, by either name).
UNSAFE_LAYERS = ("Lambda", "__lambda__")


def has_unsafe_layer(config: Any) -> bool:
    """Whether a Keras config (read as JSON, nothing built) holds a layer that safe mode refuses."""
    return any(layer.get("class_name") in UNSAFE_LAYERS for layer in _layers(config))


def _layers(config: Any):
    """Every layer config (a dict with a class_name) nested anywhere in a Keras config."""
    if isinstance(config, dict):
        if "class_name" in config:
            yield config
        for value in config.values():
            yield from _layers(value)
    elif isinstance(config, list):
        for value in config:
            yield from _layers(value)


def _unsafe(uri: str) -> ArtifactError:
    return ArtifactError(
        f"{uri} needs unsafe deserialisation (e.g. a Lambda layer holding Python code); "
        "beamvision loads models in Keras safe mode only"
    )


def _load_keras_safely(local_path: str, uri: str) -> keras.Model:
    import keras

    from beamvision.models.alexnet import adaptive_pool_class
    from beamvision.models.preprocessing import preprocess_class

    preprocess_class(), adaptive_pool_class()  # beamvision's own layers, registered before loading
    try:
        return keras.saving.load_model(local_path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a bad or unsafe file.
        if "safe_mode" in str(exc) or "unsafe" in str(exc).lower():
            raise _unsafe(uri) from None
        raise ArtifactError(f"cannot load {uri}: {one_line(exc)}") from None


def _check_model_matches(model: keras.Model, manifest: Manifest, uri: str) -> None:
    outputs = int(model.output_shape[-1])
    if outputs != manifest.num_classes:
        raise ArtifactError(
            f"model artifact at {uri} has {manifest.num_classes} labels but its model has {outputs} outputs"
        )
    expected_shape = (None, manifest.input_size, manifest.input_size, 3)
    if tuple(model.input_shape) != expected_shape or model.inputs[0].dtype != "uint8":
        raise ArtifactError(
            f"model artifact at {uri} must take uint8 images of shape {expected_shape}; "
            f"its model takes {model.inputs[0].dtype} {tuple(model.input_shape)}"
        )


def artifact_exists(uri: str) -> bool:
    """Whether an artifact is at ``uri``: its manifest, the commit point, is there.

    The one rule of "an artifact already exists" (what ``--overwrite`` is
    needed to replace) and of "``--weights`` names an artifact".
    """
    return storage.exists(storage.join(uri, MANIFEST_FILE))


def check_free(uri: str, overwrite: bool) -> None:
    """Refuses to write an artifact over an existing one unless ``overwrite``.

    Raises:
        ArtifactError: naming ``uri`` and ``--overwrite``.
    """
    if not overwrite and artifact_exists(uri):
        raise ArtifactError(f"an artifact already exists at {uri} (pass --overwrite to replace it)")
