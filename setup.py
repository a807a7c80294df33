"""Distribution "beamvision": batch image classification on Apache Beam and Keras.

Installs the packages ``pipelines`` (entry points), ``transforms`` (Beam
transforms) and ``models`` (architecture registry and artifact format), and the
``beamvision`` console script. The same file is what ``--setup_file`` ships to
Dataflow workers.
"""

from setuptools import setup

# Lower bounds are the versions the test suite runs against (see README).
INSTALL_REQUIRES = [
    "apache-beam[gcp]>=2.77.0",
    "tensorflow>=2.21.0",
    "keras>=3.15.0",
    "pyarrow>=25.0.0",
    "pillow>=12.3.0",
    "google-cloud-storage>=3.17.0",
    "numpy>=2.0",
    "matplotlib>=3.9",  # evaluate's confusion-matrix PNG
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=9.0",
        "pytest-timeout>=2.3",
        "gcp-storage-emulator>=2026.7.19",
        "scikit-learn>=1.9.0",
        "scikit-image>=0.26.0",
        "ruff>=0.17.0",
        "pandas>=2.2",
    ],
    # benchmarks/: the baseline uses Beam's TFModelHandlerNumpy, which imports tensorflow_hub.
    "bench": [
        "tensorflow-hub>=0.16.1",
        "psutil>=5.9",
    ],
}

setup(
    name="beamvision",
    version="0.1.0",
    description="Distributed batch image classification on Apache Beam and TensorFlow/Keras",
    python_requires=">=3.10",
    packages=["pipelines", "transforms", "models"],
    package_data={"models": ["labels/*.txt"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["beamvision = pipelines.cli:main"]},
)
