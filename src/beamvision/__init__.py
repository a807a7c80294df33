"""beamvision: distributed batch image classification on Apache Beam and TensorFlow/Keras.

The one import package of the distribution. Its subpackages are layered, and
each imports only the layers below it:

- ``beamvision.pipelines``: the commands (``beamvision <command>``), thin.
- ``beamvision.transforms``: Beam transforms, their DoFns and the worker runtime.
- ``beamvision.models``: the Keras side: architectures, the artifact format,
  prepare's dataset format, training and classification metrics.
- ``beamvision.storage``: whole-file I/O on any Beam filesystem, used by all three.
- ``beamvision.console`` (and ``beamvision.stderr_filter``): what a run prints,
  the quiet start and the progress line, used by all three.
- ``beamvision.values``: the rules of a value (a positive integer, a fraction,
  one of some choices) with one-line messages: a flag's type, and what tune
  checks its space file with.

In the source tree the three subpackages are the top-level folders
``pipelines/``, ``transforms/`` and ``models/``, and this package root is
``src/beamvision/`` (setup.py maps them). This module holds the version and imports
nothing, so importing it is free.
"""

__version__ = "0.1.0"
