"""beamvision transforms: Beam's composite PTransforms and the plain functions they call.

The middle layer: it imports ``beamvision.models`` and ``beamvision.storage``,
never ``beamvision.pipelines``. ``rows`` (schemas, error rows, metrics
namespace) is the module every other one builds on; ``dataset``, ``training``
and ``evaluation`` are the plain training-side functions that ``prepare``,
``train`` and ``evaluate`` (and Beam workers running them) share.
"""
