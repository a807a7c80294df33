"""beamvision models: the architecture registry and the model artifact format.

Importing the package registers every architecture (one module per family) and
the custom preprocessing layer that artifacts need to load.
"""

from models import alexnet, keras_applications, squeezenet  # noqa: F401  (registration)
from models.errors import ArtifactError, ModelError
from models.registry import ArchitectureSpec, create_model, get_spec, list_models, register

__all__ = [
    "ArchitectureSpec",
    "ArtifactError",
    "ModelError",
    "create_model",
    "get_spec",
    "list_models",
    "register",
]
