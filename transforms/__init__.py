"""beamvision transforms: Beam's composite PTransforms, their private DoFns and the worker runtime.

The middle layer: it imports ``beamvision.models`` and the package root
(``storage``, ``console``), never ``beamvision.pipelines``. ``rows`` (the
records a pipeline carries, schemas, error rows, metrics namespace) is the
module every other one builds on. Plain functions here are the ones a
transform calls per element (decoding, archive members in ``members``,
thumbnails); an inference engine is one class in ``engines``; the Keras side
lives in ``beamvision.models``.
"""
