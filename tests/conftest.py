"""Shared pytest fixtures: a real GCS-protocol server, real photos, ImageNet weights offline.

``gcs_bucket`` starts ``gcp-storage-emulator`` on 127.0.0.1 once per session and
points the Google Cloud Storage client (which Beam's ``gs://`` filesystem uses)
at it through ``STORAGE_EMULATOR_HOST``; nothing is mocked. ``KERAS_HOME`` is a
temporary directory, so the ImageNet code path loads weight files that the
tests place where Keras looks, and never touches the user's own cache.

With ``make test`` the suite runs on every core (pytest-xdist): each worker
process has its own emulator, Keras home and module fixtures; the costly inputs
that tests only read are built once for all workers (``built_once``).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_EMULATOR_PORT = _free_port()
os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{_EMULATOR_PORT}"
os.environ.setdefault("GOOGLE_CLOUD_PROJECT", "beamvision-test")
# No credential lookup may probe the GCE metadata server from a test machine.
os.environ["NO_GCE_CHECK"] = "true"
# Keras reads KERAS_HOME once, at import: every test of this process finds the
# ImageNet weight files that ``imagenet_mobilenet_v2`` places here.
_KERAS_HOME = tempfile.mkdtemp(prefix="beamvision-keras-home-")
os.environ["KERAS_HOME"] = _KERAS_HOME


def _connect_to_the_emulator_anonymously() -> None:
    """Skips Beam's credential probe in this test process: the emulator needs no credentials.

    Without credentials, Beam retries ``google.auth.default()`` with backoff for
    about 25 seconds per process before it connects anonymously. Beam has no
    public switch for its GCS filesystem (``--no_auth`` covers only the
    Dataflow client), so the tests set its cached answer, "no credentials",
    themselves. This is a test-only shortcut; beamvision itself never does it.
    """
    from apache_beam.internal.gcp import auth

    with auth._Credentials._credentials_lock:
        auth._Credentials._credentials = None
        auth._Credentials._credentials_init = True


_connect_to_the_emulator_anonymously()


def pytest_collection_modifyitems(items):
    """Slow tests first: the xdist workers then share them out, instead of one ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def built_once(tmp_path_factory, name: str, build) -> str:
    """A folder that ``build(folder)`` fills once per test session, however many xdist workers ask for it.

    Worksteal shares one module's tests out among the workers, so a module
    fixture that trains a model would train it once in each; here the first
    worker builds it under the session's shared temporary folder while the
    others wait on a lock (pytest-xdist's recipe for a fixture run once).
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's folder, shared by its workers
    folder = root / name
    with FileLock(f"{folder}.lock"):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return str(folder)


def most_bytes_held(result) -> int:
    """The most bytes a worker process of a finished run held for its reads and decodes (a Beam metric)."""
    from apache_beam.metrics.metric import MetricsFilter

    from beamvision.transforms.concurrency import BYTES_HELD_METRIC

    found = result.metrics().query(MetricsFilter().with_name(BYTES_HELD_METRIC))["distributions"]
    return max((record.committed or record.attempted).max for record in found)


@pytest.fixture(scope="session")
def gcs_emulator():
    """A running gcp-storage-emulator; yields its http://host:port."""
    port = _EMULATOR_PORT
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gcp_storage_emulator",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--in-memory",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    host = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("gcp-storage-emulator did not start") from None
            time.sleep(0.2)
    yield host
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    """A fresh, empty bucket on the emulator; yields ``gs://NAME``."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="beamvision-test", credentials=AnonymousCredentials())
    name = f"bv-{uuid.uuid4().hex[:12]}"
    client.create_bucket(name)
    return f"gs://{name}"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Three digit classes, 12 images each, prepared once at 32 px; yields (image root, prepared prefix).

    Architectures whose minimum input is larger train at it with ``--input_size``
    (train resizes in tf.data), so one prepare serves every architecture. Built
    once for all xdist workers: tests only read it.
    """

    def build(folder):
        from digits import render_subset

        from beamvision.pipelines import prepare

        root = render_subset(str(folder / "tiny"), classes=3, per_class=12)
        flags = ["--image_size", "32", "--val_fraction", "0.2", "--test_fraction", "0.2"]
        prepare.run(["--input", root, "--output", str(folder / "tiny32" / "data"), *flags])

    folder = built_once(tmp_path_factory, "tiny", build)
    return os.path.join(folder, "tiny"), os.path.join(folder, "tiny32", "data")


# SGD: Keras traces Adam's update about twice as slowly; at this rate 12 epochs learn the crops.
PHOTO_TRAINING = ("--epochs", "12", "--optimizer", "sgd", "--learning_rate", "0.05", "--batch_size", "32")


@pytest.fixture(scope="session")
def trained_photos(tmp_path_factory):
    """mobilenet_v2 at 64 px, trained by prepare and train on crops of 7 real photos; its folders.

    Returns (work folder, photos, prepared data, model); optimize, convert and serve tests share it.
    Built once for all xdist workers (``built_once``): tests write only to their own folders.
    """

    from photos import write_photo_classes

    from beamvision.pipelines import prepare, train

    def build(work):
        photos, data, model = str(work / "photos"), str(work / "data"), str(work / "model")
        write_photo_classes(photos, per_class=40, size=(96, 72))
        # A quarter for the test split: the accuracies compared are then over ~65 images, not ~25.
        prepare.run(["--input", photos, "--output", data, "--image_size", "64", "--test_fraction", "0.25"])
        # --engines openvino: the artifact stores its fp32 OpenVINO model, which optimize starts from.
        argv = ["--data", data, "--architecture", "mobilenet_v2", "--output", model, "--engines", "openvino"]
        train.run([*argv, *PHOTO_TRAINING])

    work = pathlib.Path(built_once(tmp_path_factory, "optimize-trained", build))
    return work, str(work / "photos"), str(work / "data"), str(work / "model")


@pytest.fixture(scope="session")
def multilabel(tmp_path_factory):
    """A trained multi-label artifact, 12 real tiles and one classify run of them (tests/multilabel.py).

    Yields the folder holding ``model/``, ``single/``, ``images/`` and
    ``results/``; built once for all xdist workers: tests only read it.
    """
    import pathlib

    import multilabel as built

    return pathlib.Path(built_once(tmp_path_factory, "multilabel", lambda folder: built.build(folder)))


@pytest.fixture(scope="session")
def photos():
    """Real RGB photos that ship with scikit-image and scikit-learn, as uint8 arrays."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    shipped = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    return shipped + list(load_sample_images().images)


@pytest.fixture(scope="session")
def photo_batch(photos):
    """Returns ``batch(size)``: the photos resized to ``size`` x ``size``, uint8 [n, size, size, 3]."""
    import numpy as np
    from PIL import Image

    def batch(size: int):
        return np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for p in photos])

    return batch


@pytest.fixture(scope="session")
def corpus(photos):
    """The odd-and-broken file corpus: relative path -> (bytes, Expected)."""
    from corpus import build_corpus

    return build_corpus(photos)


@pytest.fixture(autouse=True)
def _default_verbosity():
    """Every test starts at the default verbosity.

    A command run in the test's process with --quiet sets it for the process
    (as it should: a process runs one command); a later test on that xdist
    worker would otherwise print no epoch lines.
    """
    yield
    from beamvision import console

    console.configure()


@pytest.fixture(scope="session", autouse=True)
def _remove_keras_home():
    yield
    shutil.rmtree(_KERAS_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def imagenet_mobilenet_v2():
    """MobileNetV2 "ImageNet" weights written where Keras looks; yields the Keras reference model."""
    from keras_cache import write_mobilenet_v2_weights

    return write_mobilenet_v2_weights(_KERAS_HOME)


@pytest.fixture(scope="session")
def nightly_models(tmp_path_factory) -> dict[str, str]:
    """One small network saved as version 1 and version 2 of the model ``nightly`` (classes a, b, c)."""
    from beamvision.models import create_model
    from beamvision.models.artifact import new_manifest, save_artifact

    model = create_model("mobilenet_v2", num_classes=3, input_size=32)
    root = tmp_path_factory.mktemp("nightly-models")
    uris = {}
    for version in ("1", "2"):
        uris[version] = str(root / f"v{version}")
        manifest = new_manifest(
            model, "mobilenet_v2", ["a", "b", "c"], "none", name="nightly", version=version
        )
        save_artifact(model, manifest, uris[version])
    return uris
