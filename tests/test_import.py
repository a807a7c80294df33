"""``beamvision import``: users' own Keras models, made here by plain Keras code, as artifacts.

The models are trained in the test on crops of real photos that ship in
scikit-image and scikit-learn, then saved as a user would (``model.save``):
a Sequential model in a .keras file expecting [0, 1] pixels, and a
functional model of any input size giving logits, in a legacy .h5 file,
expecting [-1, 1]. Imported, each must classify the photos as the user's
own model does on the same pixels, through classify and evaluate.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from photos import CLASSES, write_photo_classes
from PIL import Image

from beamvision.models.artifact import load_artifact
from beamvision.pipelines.cli import main

SIZE = 32


def _pixels(paths: list[str]) -> np.ndarray:
    return np.stack(
        [
            np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
            for p in paths
        ]
    )


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """(folder of class folders, labels file, uint8 pixels [n, 32, 32, 3], class indices [n])."""
    root = tmp_path_factory.mktemp("import")
    written = write_photo_classes(str(root / "photos"), per_class=10, size=(48, 36), seed=3)
    paths = [p for name in CLASSES for p in written[name]]
    labels = np.repeat(np.arange(len(CLASSES)), 10)
    (root / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    return root, str(root / "photos"), str(root / "labels.txt"), _pixels(paths), labels


def _fit(model, x, y, loss):
    import keras

    keras.utils.set_random_seed(0)
    model.compile(keras.optimizers.Adam(3e-3), loss)
    model.fit(x, y, batch_size=16, epochs=25, verbose=0)
    return model


@pytest.fixture(scope="module")
def sequential_keras(photos):
    """A Sequential model saved as .keras, trained on pixels / 255 (what --preprocessing unit feeds)."""
    import keras

    root, _, _, x, y = photos
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            layers.Conv2D(16, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(32, 3, activation="relu"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(len(CLASSES), activation="softmax", name="scores"),
        ]
    )
    _fit(model, x / 255.0, y, "sparse_categorical_crossentropy")
    path = str(root / "user.keras")
    model.save(path)
    return path, model


@pytest.fixture(scope="module")
def functional_h5(photos):
    """A functional model of any input size, with logits, saved as legacy .h5, trained on [-1, 1] pixels."""
    import keras

    root, _, _, x, y = photos
    layers = keras.layers
    inputs = keras.Input((None, None, 3))
    hidden = layers.Conv2D(16, 3, activation="relu")(inputs)
    hidden = layers.BatchNormalization()(hidden)
    hidden = layers.Conv2D(32, 3, strides=2, activation="relu")(hidden)
    pooled = layers.GlobalMaxPooling2D()(hidden)
    logits = layers.Dense(len(CLASSES), name="logits")(layers.Dropout(0.1)(pooled))
    model = keras.Model(inputs, logits)
    _fit(model, x / 127.5 - 1, y, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    path = str(root / "user.h5")
    model.save(path)
    return path, model


def _results(output: str) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in glob.glob(f"{output}/results-*.parquet")]
    return pd.concat(frames).set_index("image_uri").sort_index()


def _classify_and_evaluate(
    model_dir: str, folder: str, output: str, *flags: str
) -> tuple[pd.DataFrame, dict]:
    assert main(["classify", "--input", folder, "--model", model_dir, "--output", output, *flags]) == 0
    assert main(["evaluate", "--results", output, "--truth", "folders", "--output", f"{output}-scored"]) == 0
    with open(f"{output}-scored/metrics.json") as f:
        return _results(output), json.load(f)


def test_a_sequential_keras_model_classifies_as_its_own_keras_does(
    photos, sequential_keras, tmp_path, capsys
):
    _, folder, labels, x, y = photos
    path, user = sequential_keras
    out = str(tmp_path / "mine")
    argv = ["import", "--model", path, "--labels", labels, "--preprocessing", "unit", "--output", out]
    assert main([*argv, "--name", "mine", "--version", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"imported {path} as mine version 1: 32px, 7 classes, output softmax" in printed

    artifact = load_artifact(out)
    manifest = artifact.manifest
    assert (manifest.architecture, manifest.preprocessing, manifest.input_size) == ("imported", "unit", SIZE)
    assert manifest.labels == list(CLASSES) and not manifest.multi_label
    origin = manifest.origin
    assert (origin["format"], origin["output"], origin["classifier_layer"]) == ("keras", "softmax", "scores")
    with open(path, "rb") as f:
        import hashlib

        assert origin["sha256"] == hashlib.sha256(f.read()).hexdigest() and origin["uri"] == path
    # The artifact's model takes uint8 pixels and gives what the user's model gives on pixels / 255.
    ours = artifact.model.predict(x, verbose=0)
    np.testing.assert_allclose(ours, user.predict(x / 255.0, verbose=0), atol=1e-5)
    assert (ours.argmax(1) == y).mean() >= 0.8  # it learnt the photos: the comparison means something

    results, metrics = _classify_and_evaluate(out, folder, str(tmp_path / "results"), "--embeddings")
    assert len(results) == 70 and set(results.model_name) == {"mine"}
    expected = np.array(CLASSES)[user.predict(x / 255.0, verbose=0).argmax(1)]
    uris = [os.path.join(folder, name, f"{i:04d}.jpg") for name in CLASSES for i in range(10)]
    agreement = (results.loc[uris, "label"].to_numpy() == expected).mean()
    print(f"sequential .keras: classify vs Keras {agreement:.1%}, accuracy {metrics['accuracy']:.1%}")
    assert agreement >= 0.9, agreement  # classify decodes and resizes the JPEGs itself
    assert metrics["accuracy"] >= 0.8
    assert {len(e) for e in results.embedding} == {32}  # the classifier's input: the pooled features

    # train --weights starts from it (its architecture is the artifact's): a new head for new labels.
    data, tuned = str(tmp_path / "data"), str(tmp_path / "tuned")
    two = str(tmp_path / "two")
    for name in ("cat", "coffee"):
        shutil.copytree(os.path.join(folder, name), os.path.join(two, name))
    assert main(["prepare", "--input", two, "--output", data, "--image_size", str(SIZE), "--quiet"]) == 0
    schedule = ["--epochs", "2", "--batch_size", "8", "--augment", "none", "--freeze_base", "--quiet"]
    assert main(["train", "--data", data, "--weights", out, "--output", tuned, *schedule]) == 0
    trained = load_artifact(tuned)
    assert trained.manifest.labels == ["cat", "coffee"] and trained.manifest.architecture == "imported"
    assert trained.manifest.origin == {**origin, "output": "softmax"}
    assert trained.manifest.preprocessing == "unit" and trained.model.output_shape == (None, 2)
    # The base is the imported model's, frozen: its convolutions are the user's, weight for weight.
    conv = user.layers[0]
    np.testing.assert_array_equal(trained.model.get_layer(conv.name).get_weights()[0], conv.get_weights()[0])


@pytest.mark.slow
def test_a_functional_h5_model_with_logits_runs_on_both_engines(photos, functional_h5, tmp_path, capsys):
    _, folder, labels, x, y = photos
    path, user = functional_h5
    out = str(tmp_path / "mine")
    argv = ["import", "--model", path, "--labels", labels, "--preprocessing", "tf", "--output", out]
    assert main([*argv, "--input_size", str(SIZE), "--engines", "openvino"]) == 0
    assert "output logits (unnormalised scores: a softmax is added)" in capsys.readouterr().out
    artifact = load_artifact(out)
    assert artifact.manifest.origin["format"] == "h5" and "openvino/model.xml" in artifact.manifest.files
    ours = artifact.model.predict(x, verbose=0)
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, rtol=1e-5)
    logits = user.predict(x / 127.5 - 1, verbose=0)
    np.testing.assert_array_equal(ours.argmax(1), logits.argmax(1))
    assert (ours.argmax(1) == y).mean() >= 0.8

    tf_results, tf_metrics = _classify_and_evaluate(out, folder, str(tmp_path / "tf"))
    ov_results, ov_metrics = _classify_and_evaluate(out, folder, str(tmp_path / "ov"), "--engine", "openvino")
    print(f"functional .h5: openvino vs tensorflow {(tf_results.label == ov_results.label).mean():.1%}")
    assert (tf_results.label == ov_results.label).mean() >= 0.95
    assert tf_metrics["accuracy"] >= 0.8 and abs(tf_metrics["accuracy"] - ov_metrics["accuracy"]) <= 0.05

    # optimize quantises it as any artifact, on data prepare wrote from the same folders.
    data, int8 = str(tmp_path / "data"), str(tmp_path / "int8")
    assert main(["prepare", "--input", folder, "--output", data, "--image_size", str(SIZE), "--quiet"]) == 0
    assert (
        main(["optimize", "--model", out, "--data", data, "--output", int8, "--calibration_size", "40"]) == 0
    )
    quantised = load_artifact(int8).manifest
    assert quantised.quantization["precision"] == "int8" and quantised.origin == artifact.manifest.origin
    q_results, _ = _classify_and_evaluate(int8, folder, str(tmp_path / "q"), "--engine", "openvino")
    print(f"functional .h5: int8 vs tensorflow {(q_results.label == tf_results.label).mean():.1%}")
    assert (q_results.label == tf_results.label).mean() >= 0.85


@pytest.fixture(scope="module")
def subclassed_savedmodel(photos):
    """A subclassed Keras model (no config to rebuild it from) exported as a SavedModel folder."""
    import keras

    root, _, _, x, y = photos
    layers = keras.layers

    class PhotoNet(keras.Model):
        def __init__(self):
            super().__init__()
            self.convs = [layers.Conv2D(16, 3, activation="relu"), layers.MaxPooling2D()]
            self.convs += [layers.Conv2D(32, 3, activation="relu"), layers.GlobalAveragePooling2D()]
            self.classify = layers.Dense(len(CLASSES), activation="softmax")

        def call(self, images):
            for layer in self.convs:
                images = layer(images)
            return self.classify(images)

    model = _fit(PhotoNet(), x / 255.0, y, "sparse_categorical_crossentropy")
    path = str(root / "exported")
    model.export(path, verbose=False)
    return path, model


@pytest.mark.slow
def test_a_subclassed_model_exported_as_a_savedmodel_classifies(photos, subclassed_savedmodel, tmp_path):
    _, folder, labels, x, y = photos
    path, user = subclassed_savedmodel
    out = str(tmp_path / "mine")
    argv = ["import", "--model", path, "--labels", labels, "--preprocessing", "unit", "--output", out]
    assert main([*argv, "--input_size", "64"]) == 2  # the signature fixes 32 px
    assert main(argv) == 0
    artifact = load_artifact(out)
    origin = artifact.manifest.origin
    assert (origin["format"], origin["output"], origin["classifier_layer"]) == ("savedmodel", "softmax", None)
    assert "savedmodel/saved_model.pb" in artifact.manifest.files
    ours = artifact.model.predict(x, verbose=0)
    np.testing.assert_allclose(ours, user.predict(x / 255.0, verbose=0), atol=1e-5)
    learnt = (ours.argmax(1) == y).mean()
    assert learnt >= 0.6  # (chance 1/7): the comparisons below mean something

    results, metrics = _classify_and_evaluate(out, folder, str(tmp_path / "results"))
    expected = np.array(CLASSES)[ours.argmax(1)]
    uris = [os.path.join(folder, name, f"{i:04d}.jpg") for name in CLASSES for i in range(10)]
    assert (results.loc[uris, "label"].to_numpy() == expected).mean() >= 0.9
    assert abs(metrics["accuracy"] - learnt) <= 0.1
    ov_results, _ = _classify_and_evaluate(out, folder, str(tmp_path / "ov"), "--engine", "openvino")
    print(f"savedmodel: openvino vs tensorflow {(ov_results.label == results.label).mean():.1%}")
    assert (ov_results.label == results.label).mean() >= 0.95
    # optimize carries the SavedModel's files into the INT8 artifact, which loads and runs.
    data, int8 = str(tmp_path / "data"), str(tmp_path / "int8")
    assert main(["prepare", "--input", folder, "--output", data, "--image_size", str(SIZE), "--quiet"]) == 0
    assert (
        main(["optimize", "--model", out, "--data", data, "--output", int8, "--calibration_size", "40"]) == 0
    )
    assert load_artifact(int8).manifest.origin == origin
    no_head = ["train", "--data", data, "--weights", out, "--output", str(tmp_path / "t"), "--epochs", "1"]
    assert main(no_head) == 2  # its layers are hidden: no new head can go on it
    q_results, _ = _classify_and_evaluate(int8, folder, str(tmp_path / "q"), "--engine", "openvino")
    print(f"savedmodel: int8 vs tensorflow {(q_results.label == results.label).mean():.1%}")
    assert (q_results.label == results.label).mean() >= 0.85
    # Its layers are behind the signature: no embedding, said in one line before any work.
    embeddings = [
        "classify",
        "--input",
        folder,
        "--model",
        out,
        "--output",
        str(tmp_path / "e"),
        "--embeddings",
    ]
    assert main(embeddings) == 2


def test_a_sigmoid_output_or_logits_with_multi_label_import_as_multi_label(photos, tmp_path, capsys):
    import keras

    _, _, labels, _, _ = photos
    model = keras.Sequential(
        [keras.Input((SIZE, SIZE, 3)), keras.layers.Flatten(), keras.layers.Dense(7, activation="sigmoid")]
    )
    path = str(tmp_path / "tags.keras")
    model.save(path)
    out = str(tmp_path / "tags")
    assert (
        main(["import", "--model", path, "--labels", labels, "--preprocessing", "none", "--output", out]) == 0
    )
    manifest = load_artifact(out).manifest
    assert manifest.multi_label and manifest.origin["output"] == "sigmoid"

    # Multi-label logits (a model trained with from_logits=True) need --multi_label: a sigmoid, not a softmax.
    logits = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Flatten(), keras.layers.Dense(7)])
    logits.save(str(tmp_path / "logits.keras"))
    logits.export(str(tmp_path / "logits-sm"), verbose=False)
    pixels = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    expected = 1 / (1 + np.exp(-logits.predict(pixels / 255.0, verbose=0)))
    for source in ("logits.keras", "logits-sm"):
        argv = ["import", "--model", str(tmp_path / source), "--labels", labels, "--preprocessing", "unit"]
        out = str(tmp_path / f"tags-{source}")
        assert main([*argv, "--output", out, "--multi_label"]) == 0
        artifact = load_artifact(out)
        assert artifact.manifest.multi_label and artifact.manifest.origin["output"] == "logits"
        np.testing.assert_allclose(artifact.model.predict(pixels, verbose=0), expected, rtol=1e-4, atol=1e-5)
    single = keras.Sequential(
        [keras.Input((SIZE, SIZE, 3)), keras.layers.Flatten(), keras.layers.Dense(7, activation="softmax")]
    )
    single.save(str(tmp_path / "single.keras"))
    argv = [
        "import",
        "--model",
        str(tmp_path / "single.keras"),
        "--labels",
        labels,
        "--preprocessing",
        "unit",
    ]
    assert main([*argv, "--output", str(tmp_path / "x"), "--multi_label"]) == 2
    assert "its output is a softmax, one label an image: drop --multi_label" in capsys.readouterr().err


def test_a_model_and_a_savedmodel_in_a_bucket_import_into_the_bucket(photos, tmp_path, gcs_bucket):
    """gs:// in and out: a .keras file downloaded, a SavedModel folder copied, the artifact written there."""
    import keras

    from beamvision import storage

    _, _, labels, x, _ = photos
    model = keras.Sequential(
        [keras.Input((SIZE, SIZE, 3)), keras.layers.Flatten(), keras.layers.Dense(7, activation="softmax")]
    )
    model.save(str(tmp_path / "flat.keras"))
    model.export(str(tmp_path / "flat-sm"), verbose=False)
    storage.write_atomic(f"{gcs_bucket}/in/flat.keras", local_path=str(tmp_path / "flat.keras"))
    for folder, _, names in os.walk(tmp_path / "flat-sm"):
        for name in names:
            relative = os.path.relpath(os.path.join(folder, name), tmp_path)
            storage.write_atomic(f"{gcs_bucket}/in/{relative}", local_path=os.path.join(folder, name))
    expected = model.predict(x / 255.0, verbose=0)
    for source in ("flat.keras", "flat-sm"):
        out = f"{gcs_bucket}/models/{source}"
        argv = ["import", "--model", f"{gcs_bucket}/in/{source}", "--labels", labels, "--output", out]
        assert main([*argv, "--preprocessing", "unit"]) == 0
        artifact = load_artifact(out)
        assert artifact.manifest.origin["uri"] == f"{gcs_bucket}/in/{source}"
        np.testing.assert_allclose(artifact.model.predict(x, verbose=0), expected, atol=1e-5)


def _hostile_models(tmp_path, labels_file: str) -> dict:
    """name -> (argv tail, the one line's expected part); each a model a user might really hand over."""
    import keras

    layers = keras.layers
    made = {}

    def save(name, model, suffix=".keras"):
        path = str(tmp_path / f"{name}{suffix}")
        model.save(path)
        return path

    lam = keras.Sequential([keras.Input((SIZE, SIZE, 3)), layers.Lambda(lambda t: t * 2.0), layers.Flatten(),
                            layers.Dense(7, activation="softmax")])  # fmt: skip
    made["lambda"] = (save("lambda", lam), "Lambda layer, which holds Python code")
    six = keras.Sequential(
        [keras.Input((SIZE, SIZE, 3)), layers.Flatten(), layers.Dense(6, activation="softmax")]
    )
    made["six outputs"] = (save("six", six), "it has 6 outputs but the labels name 7 classes")
    table = keras.Sequential([keras.Input((10,)), layers.Dense(7, activation="softmax")])
    made["not an image"] = (save("table", table), "it must take one batch of RGB images")
    grey = keras.Sequential([keras.Input((SIZE, SIZE, 1)), layers.Flatten(), layers.Dense(7)])
    made["one channel"] = (save("grey", grey), "shape (batch, height, width, 3); it takes (None, 32, 32, 1)")
    anysize = keras.Sequential(
        [keras.Input((None, None, 3)), layers.GlobalAveragePooling2D(), layers.Dense(7)]
    )
    made["any size"] = (save("anysize", anysize), "give the size to run it at with --input_size")
    (tmp_path / "notes.keras").write_text("not a model")
    made["not a zip"] = (str(tmp_path / "notes.keras"), "not a keras model file")
    signatureless = str(tmp_path / "no-signature")
    import tensorflow as tf

    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, signatureless)
    made["no signature"] = (signatureless, "it has no serving_default signature (it has: none)")
    os.makedirs(tmp_path / "saved")
    made["a folder"] = (str(tmp_path / "saved"), "or a SavedModel folder holding saved_model.pb")
    return made


def test_hostile_and_wrong_models_are_one_line_errors_and_nothing_is_written(photos, tmp_path, capsys):
    _, _, labels, _, _ = photos
    for name, (path, expected) in _hostile_models(tmp_path, labels).items():
        out = str(tmp_path / f"out-{name}")
        argv = ["import", "--model", path, "--labels", labels, "--preprocessing", "unit", "--output", out]
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("beamvision import: error: "), (name, err)
        assert expected in err[0], (name, err)
        assert not os.path.exists(out), name
    fixed = str(tmp_path / "six.keras")  # a fixed-size model run at another size
    argv = ["import", "--model", fixed, "--labels", labels, "--preprocessing", "unit", "--output", "o"]
    assert main([*argv, "--input_size", "64"]) == 2
    assert "it takes 32px images, not --input_size 64" in capsys.readouterr().err
    assert main([*argv[:-2], "--output", "o", "--preprocessing", "vgg"]) == 2  # argparse names the choices
    assert "--preprocessing: invalid choice: 'vgg'" in capsys.readouterr().err
    assert main(["import", "--model", "/no/such.keras", "--labels", labels, "--preprocessing", "unit",
                 "--output", "o"]) == 2  # fmt: skip
    assert "--model /no/such.keras: no such file" in capsys.readouterr().err
