"""beamvision models: the Keras side; no Beam API (storage goes through ``beamvision.storage``).

The architecture registry (one module per family), the model artifact format
(``artifact``), prepare's dataset format (``dataset``), training on it (the
run's config and step in ``trainer``, built from ``training``'s plain
functions, ``callbacks`` and ``checkpoints``) and classification metrics
(``metrics``). Keras is imported only where a model is built, trained or
loaded (``callbacks`` is imported by the training step alone). The bottom layer: it
imports the package root (``storage``, ``console``) and nothing else of
beamvision.

Importing the package registers every architecture (one module per family) and
the custom preprocessing layer that artifacts need to load.
"""

from beamvision.models import alexnet, keras_applications, squeezenet  # noqa: F401  (registration)
from beamvision.models.errors import ArtifactError, ModelArgumentError, ModelError
from beamvision.models.registry import ArchitectureSpec, create_model, get_spec, list_models, register

__all__ = [
    "ArchitectureSpec",
    "ArtifactError",
    "ModelArgumentError",
    "ModelError",
    "create_model",
    "get_spec",
    "list_models",
    "register",
]
