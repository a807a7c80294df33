"""Errors raised for user mistakes about models: bad names, arguments, artifacts.

Each carries a one-line message that the CLI prints as is, without a traceback.
"""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (its whitespace runs folded), cut to ``limit`` characters."""
    return " ".join(str(exc).split())[:limit]


class ModelError(ValueError):
    """An architecture, its arguments or a weights file cannot be used."""


class ArtifactError(ModelError):
    """A model artifact is missing, partial, of an unknown schema or unsafe."""


class ModelArgumentError(ModelError):
    """An argument that an architecture cannot take.

    ``argument`` is its name in ``create_model`` (``num_classes``,
    ``input_size``, ``weights``), which is also the name of the command-line
    flag that sets it, so the CLI reports it as ``--input_size 64: ...``.
    """

    def __init__(self, argument: str, value, reason: str):
        super().__init__(f"{argument} {value}: {reason}")
        self.argument = argument
        self.value = value
        self.reason = reason
