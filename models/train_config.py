"""What a training run takes: ``TrainConfig``, the rule of each of its values, and its defaults.

``beamvision train`` turns its flags into a ``TrainConfig``; ``beamvision
tune`` builds one per trial from the trial's values. Both check values by
the rules of ``VALUE_CHECKS`` (ranges, choices, the augmentations), so a
value is refused in the same words whether it came as a flag or from a
space file, and both check what depends on several values with
``TrainConfig.check``. The run itself is ``beamvision.models.trainer``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from beamvision import values
from beamvision.models.artifact import IMPORTED, artifact_exists
from beamvision.models.errors import ModelError
from beamvision.models.registry import get_spec, list_models

AUGMENTATIONS = ("flip", "rotate", "zoom", "contrast")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
# Each validation metric --monitor may name, and the data it is measured on (stats.json's
# multi_label: False, True).
MONITORS = {"val_accuracy": (False,), "val_loss": (False, True), "val_f1": (True,)}
# By multi_label, what picks a run's best epoch and stops it when --monitor names none. On a
# few dozen validation images accuracy saturates (every epoch from the first at 98% ties, and
# the first is restored, mid-schedule) while the loss still orders them: on the small_data
# digits, 93.8% -> 96.9% and 98.5% (docs/training.md, "Training on small data").
DEFAULT_MONITORS = {False: "val_loss", True: "val_f1"}
# By multi_label, what ranks tune's trials when --metric names none: losses of trials with
# different --label_smoothing are not comparable, accuracies are.
DEFAULT_RANKING = {False: "val_accuracy", True: "val_f1"}
CLASS_WEIGHTS = ("none", "balanced")

# The rule of each value a run takes, whether given as a flag's text or a file's value.
VALUE_CHECKS: dict[str, values.Check] = {
    "architecture": values.one_of(list_models()),
    "input_size": values.positive_int,
    "weights": values.text,
    "freeze_base": values.switch,
    "epochs": values.positive_int,
    "steps_per_epoch": values.positive_int,
    "batch_size": values.positive_int,
    "optimizer": values.one_of(OPTIMIZERS),
    "learning_rate": values.non_negative_float,
    "augment": values.subset_of(AUGMENTATIONS),
    "label_smoothing": values.fraction,
    "ema_momentum": values.fraction,
    "early_stopping_patience": values.positive_int,
    "monitor": values.one_of(MONITORS),
    "class_weight": values.one_of(CLASS_WEIGHTS),
    "seed": values.integer,
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run takes; the defaults are ``beamvision train``'s."""

    data: str
    architecture: str
    output: str
    input_size: int | None = None  # None: the prepared image size
    weights: str = "none"  # none, imagenet, an artifact or a weights file
    freeze_base: bool = False
    epochs: int = 60  # early stopping ends most runs sooner (small_data benchmark: 20 stopped too soon)
    steps_per_epoch: int | None = None  # None: one pass over the training split
    batch_size: int | None = None  # None: by the training split's size (training.batch_size_for)
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    augment: tuple[str, ...] = ("zoom", "rotate")  # no flip: it changes what text and digits mean
    label_smoothing: float = 0.0
    ema_momentum: float = 0.0  # 0: no weight average (docs/training.md: mixed on small data, worse INT8)
    early_stopping_patience: int = 12
    monitor: str | None = None  # None: the data's default (default_monitor)
    class_weight: str = "none"  # none, or balanced: n / (classes * count of the class) per example
    seed: int = 0
    name: str | None = None
    version: str | None = None
    overwrite: bool = False
    engines: tuple[str, ...] = ()

    def check(self) -> None:
        """Refuses what the values cannot be together, before any work.

        Raises:
            ModelError: ``--freeze_base`` without a pretrained starting point.
            ModelArgumentError: an input size or weights the architecture cannot take.
        """
        if self.freeze_base and (
            self.weights == "none" or (self.weights != "imagenet" and not artifact_exists(self.weights))
        ):
            raise ModelError(
                f"--freeze_base: needs --weights imagenet or an artifact to put a new head on "
                f"(--weights {self.weights} is not one)"
            )
        if self.architecture == IMPORTED:  # a user's model: import checked it, build_model checks the rest
            return
        # Without an input size, the prepared size is checked once the data is read.
        get_spec(self.architecture).check_arguments(input_size=self.input_size, weights=self.weights)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "augment": list(self.augment)}


def default_monitor(multi_label: bool) -> str:
    """The monitor of a run that names none: val_loss, or val_f1 (micro F1 at 0.5) on multi-label data."""
    return DEFAULT_MONITORS[multi_label]


def resolve_monitor(
    monitor: str | None,
    multi_label: bool,
    flag: str = "--monitor",
    defaults: dict[bool, str] = DEFAULT_MONITORS,
) -> str:
    """``monitor``, or the data's default in ``defaults``; ModelError for one the data does not measure.

    tune passes ``DEFAULT_RANKING``, train keeps ``DEFAULT_MONITORS``.
    """
    if monitor is None:
        return defaults[multi_label]
    if multi_label not in MONITORS[monitor]:
        kind = "multi-label" if multi_label else "single-label"
        fits = ", ".join(name for name, kinds in MONITORS.items() if multi_label in kinds)
        raise ModelError(f"{flag} {monitor}: not measured on {kind} data (choose from {fits})")
    return monitor


def defaults() -> dict[str, Any]:
    """Each value of a run that has a default, and its default."""
    return {
        f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING
    }
