"""``beamvision train``: prepared TFRecords to a trained, evaluated, versioned model artifact.

    beamvision train --data gs://bucket/data/flowers --architecture mobilenet_v2 --output gs://bucket/models/f1

The flags become a ``TrainConfig``, and ``beamvision.models.trainer`` runs
it: it trains with validation each epoch (BatchNorm statistics re-estimated first,
so validation sees what the weights have learned), keeps checkpoints so an
interrupted run resumes where it stopped, stops early (never during the
warm-up) with the best weights restored, warns when the result is near chance,
evaluates on the test split and exports the artifact that classify runs
(training config, dataset fingerprint and metrics in its manifest, and
metrics.json beside it). Data prepared with ``--multi_label`` trains a
multi-label model (sigmoid head, per-class thresholds chosen on validation)
with no flag of its own.
"""

from __future__ import annotations

import argparse

from beamvision.models import ModelArgumentError
from beamvision.models.artifact import Manifest, artifact_exists, check_free, load_manifest
from beamvision.models.metrics import DEFAULT_THRESHOLD
from beamvision.models.train_config import (
    AUGMENTATIONS,
    CLASS_WEIGHTS,
    MONITORS,
    OPTIMIZERS,
    VALUE_CHECKS,
    TrainConfig,
    default_monitor,
    defaults,
)
from beamvision.models.trainer import train
from beamvision.pipelines.flags import (
    UsageError,
    add_architecture_argument,
    add_artifact_identity_arguments,
    add_switch,
    model_argument_error,
    parse,
    value_type,
)
from beamvision.transforms.engines import engine_files


def _typed(key: str):
    """The argparse type of a training value: its rule (``train_config.VALUE_CHECKS``)."""
    return value_type(VALUE_CHECKS[key], key)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = defaults()
    parser.add_argument("--data", required=True, metavar="PREFIX", help="output of beamvision prepare")
    add_architecture_argument(parser, otherwise="the --weights artifact's, which an imported model needs")
    parser.add_argument("--output", required=True, metavar="DIR", help="model artifact directory to write")
    parser.add_argument(
        "--input_size",
        type=_typed("input_size"),
        metavar="N",
        help="model input side (default: the prepared image_size)",
    )
    parser.add_argument(
        "--weights",
        default=default["weights"],
        metavar="{none,imagenet,ARTIFACT,PATH}",
        help="start from random weights, ImageNet weights, an existing artifact (new head "
        "for the new labels) or a weights file for this architecture",
    )
    add_switch(
        parser,
        "--freeze_base",
        "train only the new classification head (with --weights imagenet or ARTIFACT)",
    )
    _add_schedule_arguments(parser, default)
    add_artifact_identity_arguments(parser, "training")


def _add_schedule_arguments(parser: argparse.ArgumentParser, default: dict) -> None:
    """How the run trains: epochs, batches, optimizer and learning rate, augmentation, early stopping."""
    parser.add_argument(
        "--epochs",
        type=_typed("epochs"),
        default=default["epochs"],
        metavar="E",
        help=f"default {default['epochs']}",
    )
    parser.add_argument(
        "--steps_per_epoch",
        type=_typed("steps_per_epoch"),
        metavar="N",
        help="batches per epoch (default: one pass over the training split)",
    )
    parser.add_argument(
        "--batch_size",
        type=_typed("batch_size"),
        default=default["batch_size"],
        metavar="B",
        help="default: by the training split's size, 16 up to 511 images, 32 up to 1,023, then 64",
    )
    parser.add_argument(
        "--optimizer",
        type=_typed("optimizer"),
        choices=OPTIMIZERS,
        default=default["optimizer"],
        help=f"default {default['optimizer']}",
    )
    parser.add_argument(
        "--learning_rate",
        type=_typed("learning_rate"),
        default=default["learning_rate"],
        metavar="LR",
        help=f"peak learning rate of the warm-up + cosine schedule (default {default['learning_rate']:g})",
    )
    parser.add_argument(
        "--augment",
        type=_typed("augment"),
        default=default["augment"],
        metavar="LIST",
        help=f"comma-separated subset of {','.join(AUGMENTATIONS)}, or none "
        f"(default {','.join(default['augment'])})",
    )
    parser.add_argument(
        "--label_smoothing",
        type=_typed("label_smoothing"),
        default=default["label_smoothing"],
        metavar="X",
        help=f"in [0, 1), default {default['label_smoothing']:g}",
    )
    parser.add_argument(
        "--ema_momentum",
        type=_typed("ema_momentum"),
        default=default["ema_momentum"],
        metavar="M",
        help="momentum of a moving average of the weights, which validation, early stopping and "
        f"the artifact then use, in [0, 1) (default {default['ema_momentum']:g}: none)",
    )
    parser.add_argument(
        "--early_stopping_patience",
        type=_typed("early_stopping_patience"),
        default=default["early_stopping_patience"],
        metavar="P",
        help="epochs without improvement of --monitor before stopping; best weights kept "
        f"(default {default['early_stopping_patience']})",
    )
    parser.add_argument(
        "--monitor",
        type=_typed("monitor"),
        choices=MONITORS,
        default=default["monitor"],
        help="validation metric that picks the best epoch and stops early (default "
        f"{default_monitor(False)}; on multi-label data {default_monitor(True)}, "
        f"micro F1 at {DEFAULT_THRESHOLD})",
    )
    parser.add_argument(
        "--class_weight",
        type=_typed("class_weight"),
        choices=CLASS_WEIGHTS,
        default=default["class_weight"],
        help="weigh each training image by its class: balanced gives class c the weight "
        f"n / (classes x images of c), so each class counts the same (default {default['class_weight']})",
    )
    parser.add_argument(
        "--seed", type=_typed("seed"), default=default["seed"], metavar="S", help=f"default {default['seed']}"
    )


def train_config(args: argparse.Namespace) -> TrainConfig:
    """train's flags as the run's config, checked together (``TrainConfig.check``).

    Raises:
        UsageError: an input size or weights the architecture cannot take, naming the flag.
        ModelError: values that cannot go together (``--freeze_base`` without pretrained weights).
    """
    config = TrainConfig(
        **{
            **{key: getattr(args, key) for key in defaults()},
            "architecture": _architecture(args),
            "data": args.data.rstrip("/"),
            "output": args.output.rstrip("/"),
            "engines": tuple(args.engines),
        }
    )
    try:
        config.check()
    except ModelArgumentError as exc:
        raise model_argument_error(exc) from None
    return config


def _architecture(args: argparse.Namespace) -> str:
    """``--architecture``, or that of the artifact ``--weights`` names (``imported``: an imported model)."""
    if args.architecture:
        return args.architecture
    if args.weights not in ("none", "imagenet") and artifact_exists(args.weights):
        return load_manifest(args.weights).architecture
    raise UsageError("--architecture: required, unless --weights names a model artifact to start from")


def run(argv: list[str] | None = None) -> Manifest:
    """Trains, evaluates and exports; prints per-epoch progress and a summary."""
    config = train_config(parse("beamvision train", __doc__.splitlines()[0], add_arguments, argv))
    check_free(config.output, config.overwrite)  # before any work, not after training
    return train(config, engine_files=engine_files).manifest
