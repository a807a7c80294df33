"""Errors raised for user mistakes about models: bad names, arguments, artifacts.

Each carries a one-line message that the CLI prints as is, without a traceback.
"""


class ModelError(ValueError):
    """An architecture, its arguments or a weights file cannot be used."""


class ArtifactError(ModelError):
    """A model artifact is missing, partial, of an unknown schema or unsafe."""
