"""Shared pytest fixtures: a real GCS-protocol server, quiet TensorFlow, temp dirs.

``gcs_bucket`` starts ``gcp-storage-emulator`` on 127.0.0.1 once per session and
points the Google Cloud Storage client (which Beam's ``gs://`` filesystem uses)
at it through ``STORAGE_EMULATOR_HOST``; nothing is mocked.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Set before beamvision is imported: models.storage then connects to the
# emulator anonymously instead of probing for credentials.
_EMULATOR_PORT = _free_port()
os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{_EMULATOR_PORT}"
os.environ.setdefault("GOOGLE_CLOUD_PROJECT", "beamvision-test")


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
