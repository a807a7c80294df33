"""Model artifacts: round trips on local disk and gs:// (emulator), and every load error."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest

from beamvision import storage
from beamvision.models import ArtifactError, create_model
from beamvision.models.artifact import (
    MANIFEST_FILE,
    MODEL_FILE,
    SCHEMA_VERSION,
    Manifest,
    load_artifact,
    load_manifest,
    new_manifest,
    save_artifact,
    verify_artifact,
)

LABELS = ["cat", "coffee", "rocket"]


@pytest.fixture(scope="module")
def small_model():
    return create_model("squeezenet", num_classes=len(LABELS), input_size=48)


def _save(model, uri, **kwargs):
    manifest = new_manifest(model, "squeezenet", LABELS, "none", **kwargs)
    return save_artifact(model, manifest, uri)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_round_trip_gives_identical_predictions(where, small_model, photo_batch, tmp_path, request):
    base = request.getfixturevalue("gcs_bucket") if where == "gcs" else str(tmp_path)
    uri = f"{base}/models/squeezenet-v1"
    written = _save(small_model, uri, name="pets", version="7", metrics={"accuracy": 0.5})

    artifact = load_artifact(uri)
    images = photo_batch(48)
    np.testing.assert_array_equal(
        artifact.model.predict(images, verbose=0), small_model.predict(images, verbose=0)
    )
    manifest = artifact.manifest
    assert manifest == written
    assert (manifest.name, manifest.version, manifest.architecture) == ("pets", "7", "squeezenet")
    assert (manifest.input_size, manifest.preprocessing, manifest.labels) == (48, "torch", LABELS)
    assert manifest.schema_version == SCHEMA_VERSION
    assert manifest.metrics == {"accuracy": 0.5}
    assert {"beamvision", "keras", "tensorflow", "python"} <= set(manifest.library_versions)
    assert manifest.files[MODEL_FILE]["bytes"] > 1_000_000
    assert len(manifest.files[MODEL_FILE]["sha256"]) == 64


def test_write_leaves_no_temporary_files(small_model, tmp_path):
    uri = str(tmp_path / "m")
    _save(small_model, uri)
    assert sorted(os.listdir(uri)) == [MANIFEST_FILE, MODEL_FILE]


def test_existing_artifact_is_kept_unless_overwrite(small_model, tmp_path):
    uri = str(tmp_path / "m")
    first = _save(small_model, uri, version="1")
    with pytest.raises(ArtifactError, match="already exists"):
        _save(small_model, uri, version="2")
    assert load_manifest(uri).version == first.version
    save_artifact(
        small_model, new_manifest(small_model, "squeezenet", LABELS, "none", version="2"), uri, True
    )
    assert load_artifact(uri).manifest.version == "2"


def test_label_count_must_match_outputs_when_saving(small_model, tmp_path):
    manifest = new_manifest(small_model, "squeezenet", [*LABELS, "extra"], "none")
    with pytest.raises(ArtifactError, match="3 outputs but the manifest has 4 labels"):
        save_artifact(small_model, manifest, str(tmp_path / "m"))


def test_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match=r"no model artifact at .*manifest.json not found"):
        load_artifact(str(tmp_path / "nothing-here"))


def test_missing_directory_on_gcs(gcs_bucket):
    with pytest.raises(ArtifactError, match="no model artifact at gs://"):
        load_artifact(f"{gcs_bucket}/nothing-here")


def test_partial_directory(small_model, tmp_path):
    uri = str(tmp_path / "m")
    _save(small_model, uri)
    os.remove(os.path.join(uri, MANIFEST_FILE))
    with pytest.raises(
        ArtifactError, match=r"incomplete model artifact .*model\.keras without manifest\.json"
    ):
        load_artifact(uri)


def _edit_manifest(uri, **changes):
    path = os.path.join(uri, MANIFEST_FILE)
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


def test_unknown_schema_version(small_model, tmp_path):
    uri = str(tmp_path / "m")
    _save(small_model, uri)
    _edit_manifest(uri, schema_version=99)
    with pytest.raises(ArtifactError, match="schema_version 99; this beamvision reads 1"):
        load_artifact(uri)


def test_manifest_that_is_not_json(small_model, tmp_path):
    uri = str(tmp_path / "m")
    _save(small_model, uri)
    with open(os.path.join(uri, MANIFEST_FILE), "w") as f:
        f.write("{not json")
    with pytest.raises(ArtifactError, match="is not valid JSON"):
        load_artifact(uri)


def test_manifest_missing_fields(small_model, tmp_path):
    uri = str(tmp_path / "m")
    _save(small_model, uri)
    path = os.path.join(uri, MANIFEST_FILE)
    with open(path) as f:
        data = json.load(f)
    del data["labels"], data["architecture"]
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(ArtifactError, match="lacks required fields: architecture, labels"):
        load_artifact(uri)


def test_label_count_different_from_model_outputs(small_model, tmp_path):
    uri = str(tmp_path / "m")
    _save(small_model, uri)
    _edit_manifest(uri, labels=["a", "b"])
    with pytest.raises(ArtifactError, match="has 2 labels but its model has 3 outputs"):
        load_artifact(uri)


def test_duplicate_labels(small_model, tmp_path):
    uri = str(tmp_path / "m")
    _save(small_model, uri)
    _edit_manifest(uri, labels=["a", "a", "b"])
    with pytest.raises(ArtifactError, match="labels must be unique"):
        load_artifact(uri)


def test_model_file_that_does_not_match_manifest(small_model, tmp_path):
    uri = str(tmp_path / "m")
    _save(small_model, uri)
    with open(os.path.join(uri, MODEL_FILE), "r+b") as f:
        f.truncate(1000)
    for check in (load_artifact, verify_artifact):
        with pytest.raises(ArtifactError, match="does not match its manifest"):
            check(uri)


def test_model_needing_unsafe_deserialisation(tmp_path):
    inputs = keras.Input((32, 32, 3), dtype="uint8")
    x = keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32") / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax")(x)
    unsafe = keras.Model(inputs, outputs)
    uri = str(tmp_path / "unsafe")
    manifest = Manifest(
        name="unsafe",
        version="1",
        architecture="squeezenet",
        input_size=32,
        preprocessing="torch",
        labels=LABELS,
        weights="none",
        created_at="2026-01-01T00:00:00+00:00",
        library_versions={},
    )
    save_artifact(unsafe, manifest, uri)
    for check in (load_artifact, verify_artifact):  # verify reads the config, never builds the model
        with pytest.raises(ArtifactError, match="needs unsafe deserialisation"):
            check(uri)


def test_verify_checks_without_building_the_model(small_model, tmp_path, monkeypatch):
    uri = str(tmp_path / "m")
    written = _save(small_model, uri)

    def build(*args, **kwargs):
        raise AssertionError("verify_artifact built the model")

    monkeypatch.setattr(keras.saving, "load_model", build)
    assert verify_artifact(uri) == written

    float_input = keras.Model(*_float_model())
    other = str(tmp_path / "float")
    save_artifact(float_input, new_manifest(float_input, "squeezenet", LABELS, "none"), other)
    with pytest.raises(ArtifactError, match=r"must take uint8 images of shape \(None, 48, 48, 3\)"):
        verify_artifact(other)


def _float_model():
    inputs = keras.Input((48, 48, 3), dtype="float32")
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    return inputs, keras.layers.Dense(len(LABELS), activation="softmax")(x)


def test_gcs_round_trip_lists_only_final_files(small_model, gcs_bucket):
    uri = f"{gcs_bucket}/a/b"
    _save(small_model, uri)
    from apache_beam.io.filesystems import FileSystems

    names = sorted(m.path.rsplit("/", 1)[-1] for m in FileSystems.match([f"{uri}/*"])[0].metadata_list)
    assert names == [MANIFEST_FILE, MODEL_FILE]
    assert storage.exists(f"{uri}/{MODEL_FILE}")


def test_multi_label_fields_round_trip_and_stay_out_of_single_label_manifests(small_model, tmp_path):
    single = _save(small_model, str(tmp_path / "single"))
    written = json.loads((tmp_path / "single" / MANIFEST_FILE).read_text())
    assert "multi_label" not in written and "thresholds" not in written
    assert load_manifest(str(tmp_path / "single")).multi_label is False
    assert single.thresholds == {}

    manifest = new_manifest(small_model, "squeezenet", LABELS, "none")
    import dataclasses

    multi = dataclasses.replace(
        manifest, multi_label=True, thresholds={"cat": 0.35, "coffee": 0.5, "rocket": 0.8}
    )
    save_artifact(small_model, multi, str(tmp_path / "multi"))
    loaded = load_artifact(str(tmp_path / "multi")).manifest
    assert loaded.multi_label is True and loaded.thresholds == {"cat": 0.35, "coffee": 0.5, "rocket": 0.8}
    assert verify_artifact(str(tmp_path / "multi")).thresholds == loaded.thresholds


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"multi_label": "yes"}, "multi_label must be true or false"),
        ({"multi_label": True, "thresholds": {"dog": 0.5}}, "thresholds must map labels"),
        ({"multi_label": True, "thresholds": {"cat": 1.5}}, "thresholds must map labels"),
        ({"thresholds": {"cat": 0.5}}, "only for a multi_label model"),
    ],
)
def test_bad_multi_label_fields(small_model, tmp_path, fields, message):
    _save(small_model, str(tmp_path / "a"))
    path = tmp_path / "a" / MANIFEST_FILE
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=message):
        load_manifest(str(tmp_path / "a"))
