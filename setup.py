"""Distribution "beamvision": batch image classification on Apache Beam and Keras.

Installs one import package, ``beamvision``, and the ``beamvision`` console
script. The package root is ``src/beamvision/`` (found by its import name, and
never on ``sys.path`` from a checkout or from the Docker image's WORKDIR, so it
cannot shadow the installed package); the product's layers keep their
top-level folders ``pipelines/``, ``transforms/``, ``models/`` and ``serving/``, and
``package_dir`` maps each to its place under ``beamvision`` (``models/`` ->
``beamvision.models``), so nothing generic lands at the top of site-packages.
The same file is what ``--setup_file`` ships to Dataflow workers (as an sdist)
and what the Docker image installs.
"""

import pathlib
import re

from setuptools import setup

HERE = pathlib.Path(__file__).parent
# The version lives in one place, src/beamvision/__init__.py (beamvision.__version__).
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "src" / "beamvision" / "__init__.py").read_text(), re.M
)[1]

# Import package -> source folder. src/beamvision/ holds the package root (version,
# storage, console); the three layers live in the product's top-level folders.
PACKAGE_DIR = {
    "beamvision": "src/beamvision",
    "beamvision.models": "models",
    "beamvision.transforms": "transforms",
    "beamvision.pipelines": "pipelines",
    "beamvision.serving": "serving",
}

# Lower bounds are the versions the test suite runs against (see docs/getting-started.md).
INSTALL_REQUIRES = [
    "apache-beam[gcp]>=2.77.0",
    "tensorflow>=2.21.0",
    "keras>=3.15.0",
    "pyarrow>=25.0.0",
    "pillow>=12.3.0",
    "google-cloud-storage>=3.17.0",
    "numpy>=2.0",
    "matplotlib>=3.9",  # evaluate's confusion-matrix PNG, review's charts
    "stream-unzip>=0.0.99",  # zip archives read member by member, without the central directory
    "jinja2>=3.1",  # review's HTML, escaped by default
    "pyyaml>=6.0",  # tune's search space files
    "tqdm>=4.66",  # the live progress line of classify and prepare
    "pandas>=2.2",  # evaluate, review and export-labels read results as DataFrames
    "openvino>=2025.0",  # --engine openvino
    "nncf>=3.4",  # beamvision optimize: INT8 post-training quantisation of the OpenVINO model
    "starlette>=1.0",  # beamvision serve: the ASGI application (routes, streamed bodies)
    "uvicorn>=0.40",  # ... and its server (graceful drain on SIGTERM)
    "ai-edge-litert>=2.0",  # convert --format tflite: LiteRT's interpreter checks the converted model
    "tf2onnx>=1.17",  # convert --format onnx: what Keras' own ONNX export calls on TensorFlow
]

# beamvision demo: its data, scikit-learn's handwritten digits (make demo installs only this extra).
DEMO_REQUIRE = ["scikit-learn>=1.9.0"]

EXTRAS_REQUIRE = {
    "test": [
        *DEMO_REQUIRE,  # the suite runs the demo's data too
        "pytest>=9.0",
        "pytest-timeout>=2.3",
        "pytest-xdist>=3.8",  # make test runs on every core
        "gcp-storage-emulator>=2026.7.19",
        "scikit-image>=0.26.0",
        "ruff>=0.17.0",
        "duckdb>=2.0",  # the docs' SQL blocks (the one-table query over incremental runs) are run
        "mkdocs>=1.6",  # the docs are built as a site, strictly, by the suite (tests/test_docs.py)
        "playwright>=1.50",  # review's page in Debian's Chromium (no browser download)
        "filelock>=3.12",  # a fixture that trains a model builds it once for all xdist workers
        "httpx>=0.28",  # the serve tests' HTTP client (64 concurrent requests on one event loop)
    ],
    "demo": DEMO_REQUIRE,
    # benchmarks/: the baseline uses Beam's TFModelHandlerNumpy, which imports tensorflow_hub;
    # throughput.py's job (d) runs Ray Data's batch inference as a peer.
    "bench": [
        "tensorflow-hub>=0.16.1",
        "psutil>=5.9",
        "ray[data]>=2.60.0",
    ],
}

setup(
    name="beamvision",
    version=VERSION,
    description="Distributed batch image classification on Apache Beam and TensorFlow/Keras",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIR),
    package_dir=PACKAGE_DIR,
    package_data={"beamvision.models": ["labels/*.txt"], "beamvision.pipelines": ["templates/*.html"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["beamvision = beamvision.pipelines.cli:console_main"]},
)
