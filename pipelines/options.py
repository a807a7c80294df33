"""Command-line options: the one definition of every beamvision flag.

Each command has one ``add_<command>_arguments`` function that declares its
flags (the CLI, its ``--help`` and deploy/metadata.json all follow it) and a
frozen config dataclass, validated once, that the command runs on. Beam
pipelines parse their own flags first and hand the rest to Beam
(``parse_pipeline_args``).

User mistakes raise ``UsageError`` with one line naming the flag and the value
received; the CLI prints it and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import sys

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions
from apache_beam.runners.runner import PipelineResult

from beamvision import storage
from beamvision.console import DEFAULT_PROGRESS_SECONDS, boolean
from beamvision.models import ModelArgumentError, get_spec, list_models
from beamvision.models.artifact import MANIFEST_FILE
from beamvision.models.registry import IMAGENET_CLASSES
from beamvision.transforms.concurrency import DEFAULT_BUFFER_MB
from beamvision.transforms.decode import DEFAULT_MAX_PIXELS
from beamvision.transforms.engines import CONVERTED_ENGINES, DEFAULT_ENGINE, ENGINES, PRECISIONS
from beamvision.transforms.outputs import RUN_ID_PATTERN
from beamvision.transforms.read import csv_column_index, list_format, parquet_has_column
from beamvision.transforms.runners import is_remote
from beamvision.transforms.sizing import DEFAULT_SIZING, READ_THREADS, WorkerSizing


class UsageError(Exception):
    """A flag or value the user gave cannot be used. The message is one line."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that raises ``UsageError`` instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message}")


def _checked_number(convert, is_valid, expected: str):
    """An argparse type that converts text and rejects invalid values, naming the value received."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not is_valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, received {text!r}")
        return value

    return parse


def _add_switch(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """An on/off flag: bare (on), or with a value, ``--flag=true`` / ``--flag=false`` / 1 / 0."""
    parser.add_argument(
        flag, type=boolean, nargs="?", const=True, default=False, metavar="true|false", help=help
    )


positive_int = _checked_number(int, lambda v: v >= 1, "a positive integer")


def run_id(text: str) -> str:
    """A run's partition name: letters, digits and . _ : - (it becomes a path segment)."""
    if not RUN_ID_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '.', '_', ':' or '-', received {text!r}")
    return text


fraction = _checked_number(float, lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)")
non_negative_float = _checked_number(float, lambda v: v >= 0.0, "a non-negative number")
positive_float = _checked_number(float, lambda v: v > 0.0 and v != float("inf"), "a positive number")


def _summary(doc_line: str) -> str:
    """A module docstring's first line without its leading ``command``: label, for --help."""
    return doc_line.split(": ", 1)[1] if doc_line.startswith("``") and ": " in doc_line else doc_line


def parse(prog: str, description: str, add_arguments, argv: list[str] | None) -> argparse.Namespace:
    """Parses ``argv`` with the flags ``add_arguments`` declares; unknown flags are errors.

    Every command also takes ``--quiet`` and ``--verbose`` (declared and
    checked here; the CLI reads them before any import, see ``beamvision.console``).
    """
    # No abbreviations: the CLI reads --quiet and --verbose before parsing, by their full names.
    parser = OneLineParser(prog=prog, description=_summary(description), allow_abbrev=False)
    add_arguments(parser)
    _add_verbosity_arguments(parser)
    return parser.parse_args(argv)


def _add_verbosity_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    _add_switch(group, "--quiet", "print no progress, only warnings, errors and the final summary")
    _add_switch(
        group, "--verbose", "show what TensorFlow, absl and Beam log (hidden by default), from INFO up"
    )


# --- flags shared by several commands -----------------------------------------


def check_model_arguments(architecture: str, flags: dict[str, str] | None = None, **arguments) -> None:
    """``ArchitectureSpec.check_arguments``, failing with a UsageError that names the flag.

    A model argument is set by the flag of the same name (``--input_size``);
    ``flags`` maps an argument that a command sets with another flag to that
    flag and its value, as the message should name them.
    """
    try:
        get_spec(architecture).check_arguments(**arguments)
    except ModelArgumentError as exc:
        source = (flags or {}).get(exc.argument, f"--{exc.argument} {exc.value}")
        raise UsageError(f"{source}: {exc.reason}") from None


def _add_architecture_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument(
        "--architecture",
        required=default is None,
        default=default,
        choices=list_models(),
        metavar="NAME",
        help=f"one of: {', '.join(list_models())}" + (f" (default {default})" if default else ""),
    )


def _add_artifact_identity_arguments(parser: argparse.ArgumentParser, made_by: str) -> None:
    parser.add_argument("--name", help="model name recorded in results (default: the architecture)")
    parser.add_argument("--version", help=f"model version recorded in results (default: {made_by} time, UTC)")
    _add_switch(parser, "--overwrite", "replace an existing artifact at --output")
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=CONVERTED_ENGINES,
        default=[],
        metavar="ENGINE",
        help="also store the model converted for these engines (openvino), so that classify "
        "--engine openvino workers do not convert it at start-up",
    )


def _add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """The limits of reading and decoding, shared by classify and prepare."""
    parser.add_argument(
        "--max_pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"larger images (width x height) are error rows (default {DEFAULT_MAX_PIXELS:,})",
    )
    parser.add_argument(
        "--buffer_mb",
        type=positive_int,
        default=DEFAULT_BUFFER_MB,
        metavar="MB",
        help="file bytes and full-size pixels each worker process holds while reading and decoding "
        f"(default {DEFAULT_BUFFER_MB}); a larger file is still read, alone",
    )


def _add_worker_arguments(parser: argparse.ArgumentParser, inference: bool) -> None:
    """How each worker process sizes its threads (beamvision.transforms.sizing): classify, prepare."""
    parser.add_argument(
        "--read_threads",
        type=positive_int,
        metavar="N",
        help=f"files each worker process reads at once (default {READ_THREADS}: reads wait on storage, "
        "not on the CPU)",
    )
    parser.add_argument(
        "--decode_threads",
        type=positive_int,
        metavar="N",
        help="decoding threads per worker process (default: the process's share of the machine's cores, "
        "cores / processes per machine)",
    )
    if not inference:
        return
    parser.add_argument(
        "--inference_threads",
        type=positive_int,
        metavar="N",
        help="threads that compute each batch (default: the process's share of the cores, or with "
        "--model_copies, cores / copies)",
    )
    parser.add_argument(
        "--model_copies",
        type=positive_int,
        metavar="N",
        help="load N models per machine, shared by all its worker processes (Beam's model_copies; 1 is "
        "Beam's large_model), instead of one per process: for models too large to hold once per vCPU",
    )


def _worker_sizing(args: argparse.Namespace) -> WorkerSizing:
    """The sizing flags as given; the processes per machine follow the runner (``build_pipeline``)."""
    return WorkerSizing(
        read_threads=args.read_threads,
        decode_threads=args.decode_threads,
        inference_threads=getattr(args, "inference_threads", None),
        model_copies=getattr(args, "model_copies", None),
    )


def _add_progress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress_every",
        type=positive_float,
        default=DEFAULT_PROGRESS_SECONDS,
        metavar="SECONDS",
        help="seconds between progress lines when stderr is not a terminal "
        f"(default {DEFAULT_PROGRESS_SECONDS:g}; a terminal gets one line, redrawn)",
    )
    _add_switch(
        parser,
        "--detach",
        "with a remote runner (Dataflow): return once the job is submitted, after printing its console URL; "
        "the job still writes its summary to --output",
    )


def check_detach(detach: bool, pipeline) -> None:
    """``--detach`` needs a runner whose job outlives this process."""
    if detach and not is_remote(pipeline):
        runner = pipeline.options.view_as(StandardOptions).runner or "DirectRunner"
        raise UsageError(
            f"--detach: a {runner} job runs on this machine and ends with this process; "
            "only a Dataflow job can be left running (--runner DataflowRunner)"
        )


def _check_file_exists(flag: str, uri: str | None) -> None:
    """A file a flag names must exist (Beam would otherwise fail with a traceback building the pipeline)."""
    if uri is not None and not storage.exists(uri):
        raise UsageError(f"{flag} {uri}: no such file")


def _check_list_column(input_list: str | None, column: str | None) -> str:
    """The URI column of an inventory --input_list (default ``uri``), checked against its header."""
    form = list_format(input_list) if input_list else None
    if column is not None and form not in ("csv", "parquet"):
        raise UsageError(f"--input_list_column {column}: only for a .csv or .parquet --input_list")
    column = column or "uri"
    try:
        if form == "csv":
            csv_column_index(input_list, column)
        elif form == "parquet":
            parquet_has_column(input_list, column)
    except ValueError as exc:
        raise UsageError(f"--input_list {input_list}: {exc}") from None
    return column


def claim_output(output: str, names: list[str], overwrite: bool, holds: str) -> None:
    """Refuses an ``--output`` that already holds a run's files, unless ``--overwrite``; then clears them.

    ``names`` are file names or globs under ``output`` (``results-*``); a rerun
    must never mix its files with stale ones of an earlier run.
    """
    from apache_beam.io.filesystems import FileSystems

    matches = FileSystems.match([storage.join(glob.escape(output), name) for name in names])
    existing = sorted({m.path for match in matches for m in match.metadata_list})
    if existing and not overwrite:
        raise UsageError(
            f"--output {output}: already holds {holds} ({len(existing)} files); "
            "choose a new place or pass --overwrite"
        )
    if existing:
        FileSystems.delete(existing)


# --- beamvision models ---------------------------------------------------------


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    _add_switch(parser, "--json", "print a JSON list instead of a table")


# --- beamvision export ---------------------------------------------------------

WEIGHTS_HELP = (
    "imagenet (Keras's published weights, from its cache dir $KERAS_HOME/models or downloaded), "
    "none (random initialisation, for tests and benchmarks), or the path or URI of a weights file"
)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    _add_architecture_argument(parser)
    parser.add_argument("--weights", required=True, metavar="{imagenet,none,PATH}", help=WEIGHTS_HELP)
    classes = parser.add_mutually_exclusive_group()
    classes.add_argument(
        "--num_classes",
        type=positive_int,
        metavar="N",
        help="output classes, named class_0 .. class_N-1 (default 1000)",
    )
    classes.add_argument(
        "--labels",
        metavar="FILE",
        help="text file of class names, one a line (local or URI); "
        "'imagenet' for the 1,000 ImageNet classes shipped with beamvision",
    )
    parser.add_argument(
        "--input_size",
        type=positive_int,
        metavar="N",
        help="square input side in pixels (default: the architecture's)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="artifact directory, local or URI")
    _add_artifact_identity_arguments(parser, "export")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    architecture: str
    weights: str | None  # None, "imagenet" or a weights file URI
    num_classes: int
    labels_source: str | None  # None (class_i), "imagenet" or a file URI
    input_size: int
    output: str
    name: str | None
    version: str | None
    overwrite: bool
    engines: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ExportConfig:
        spec = get_spec(args.architecture)
        weights = None if args.weights == "none" else args.weights
        input_size = args.input_size or spec.default_input_size
        check_model_arguments(spec.name, input_size=input_size, weights=weights)
        labels = args.labels
        if weights == "imagenet":
            if args.num_classes not in (None, IMAGENET_CLASSES) or labels not in (None, "imagenet"):
                raise UsageError(
                    "--weights imagenet: takes the 1,000 ImageNet classes; drop --num_classes/--labels"
                )
            labels = "imagenet"
        num_classes = IMAGENET_CLASSES if labels == "imagenet" else args.num_classes or IMAGENET_CLASSES
        return cls(
            spec.name,
            weights,
            num_classes,
            labels,
            input_size,
            args.output,
            args.name,
            args.version,
            args.overwrite,
            tuple(args.engines),
        )


# --- beamvision classify -------------------------------------------------------

DEFAULT_TOP_K = 5


def add_classify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="PATTERN",
        help="Beam glob (*, **), local or gs://; a bare directory means every file under it. Repeatable.",
    )
    parser.add_argument(
        "--input_list",
        metavar="FILE",
        help="image URIs: a text file, one a line, or an inventory .csv (with a header) or .parquet",
    )
    parser.add_argument(
        "--input_list_column",
        metavar="NAME",
        help="the column of a .csv or .parquet --input_list that holds the URIs (default uri)",
    )
    parser.add_argument(
        "--model", required=True, metavar="MODEL", help="model artifact directory, local or URI"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory, local or URI")
    parser.add_argument(
        "--top_k",
        type=positive_int,
        metavar="K",
        help=f"classes per image (default {DEFAULT_TOP_K}, or every class of a smaller model)",
    )
    parser.add_argument(
        "--batch_size",
        type=positive_int,
        default=32,
        metavar="N",
        help="images per inference batch (default 32)",
    )
    _add_switch(parser, "--embeddings", "also write each image's pooled features before the classifier")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=DEFAULT_ENGINE,
        help="how batches are computed: tensorflow (default) or openvino (the same model, converted on "
        "each worker; faster on Intel CPUs)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default), bf16, or auto: bf16 where the CPU computes it natively (AVX512_BF16, AMX)",
    )
    _add_decode_arguments(parser)
    _add_worker_arguments(parser, inference=True)
    _add_switch(
        parser,
        "--incremental",
        "write to OUTPUT/run=ID/ and skip files an earlier completed run under OUTPUT classified "
        "with the same model name and version, unchanged since",
    )
    parser.add_argument(
        "--run_id",
        type=run_id,
        metavar="ID",
        help="with --incremental: the run's partition name (default: the UTC start time, 20261128T031500Z)",
    )
    _add_switch(parser, "--overwrite", "replace results, errors and summary already in --output")
    _add_progress_arguments(parser)


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
    inputs: tuple[str, ...]
    input_list: str | None
    input_list_column: str
    model: str
    output: str
    top_k: int | None  # None: DEFAULT_TOP_K, or every class of a smaller model
    batch_size: int
    embeddings: bool
    max_pixels: int
    buffer_mb: int
    incremental: bool
    run_id: str | None
    overwrite: bool
    engine: str = DEFAULT_ENGINE
    precision: str = "fp32"
    workers: WorkerSizing = DEFAULT_SIZING
    progress_every: float = DEFAULT_PROGRESS_SECONDS
    detach: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClassifyConfig:
        if not args.input and not args.input_list:
            raise UsageError("give at least one --input PATTERN or an --input_list FILE")
        if args.run_id and not args.incremental:
            raise UsageError(f"--run_id {args.run_id}: only with --incremental (it names OUTPUT/run=ID)")
        _check_file_exists("--input_list", args.input_list)
        column = _check_list_column(args.input_list, args.input_list_column)
        return cls(
            tuple(args.input),
            args.input_list,
            column,
            args.model,
            args.output,
            args.top_k,
            args.batch_size,
            args.embeddings,
            args.max_pixels,
            args.buffer_mb,
            args.incremental,
            args.run_id,
            args.overwrite,
            args.engine,
            args.precision,
            _worker_sizing(args),
            args.progress_every,
            args.detach,
        )


def parse_pipeline_args(
    prog: str, description: str, add_arguments, argv: list[str] | None
) -> tuple[argparse.Namespace, PipelineOptions]:
    """Parses a pipeline's own flags, then Beam's, refusing unknown flags and bad values in one line.

    The pipeline's flags are consumed here and never reach Beam (prepare's
    ``--labels`` would clash with Dataflow's job ``--labels``). What remains
    is checked against every Beam ``PipelineOptions`` class, as Beam itself
    declares them, so a typo in a Beam flag is an error, not silently ignored.
    """
    argv = _normalise_dry_run(sys.argv[1:] if argv is None else list(argv))
    parser = OneLineParser(
        prog=prog,
        description=_summary(description),
        allow_abbrev=False,
        epilog="Beam pipeline options pass through: --runner, --direct_num_workers, --direct_running_mode, "
        "--project, --region, --temp_location, --setup_file, --sdk_container_image, ...",
    )
    add_arguments(parser)
    _add_verbosity_arguments(parser)
    args, beam_argv = parser.parse_known_args(argv)
    beam_parser = _BeamFlagsParser(prog=prog, allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(beam_parser)
    beam_parser.parse_args(beam_argv)
    return args, PipelineOptions(beam_argv)


def is_dry_run(pipeline_options: PipelineOptions) -> bool:
    return bool(pipeline_options.view_as(TestOptions).dry_run)


def build_only(pipeline) -> PipelineResult | None:
    """What ``--dry_run`` does: build the job graph, run nothing, touch no output.

    DataflowRunner builds its job without submitting it (its result is
    returned); Beam's direct runners would ignore --dry_run and run, so for
    them the graph is only built (None is returned).
    """
    runner = pipeline.options.view_as(StandardOptions).runner or "DirectRunner"
    if type(pipeline.runner).__name__ == "DataflowRunner":
        result = pipeline.run()
        steps = len(result.job.proto_pipeline.components.transforms)
    else:
        result = None
        steps = len(pipeline.to_runner_api().components.transforms)
    submitted = ", no job submitted, so no progress to follow" if is_remote(pipeline) else ""
    print(f"dry run: built the {runner} job graph ({steps} steps); nothing was run or written{submitted}")
    return result


class _BeamFlagsParser(OneLineParser):
    """Checks the flags left for Beam against Beam's own option classes, with public argparse only.

    Beam's option classes declare templated flags with
    ``add_value_provider_argument``, a method of Beam's private parser; to check
    a flag's name and value, it is an ordinary argument.
    """

    def add_value_provider_argument(self, *args, **kwargs):
        if not args[0].startswith("-"):  # Beam makes positional template arguments optional
            kwargs.setdefault("nargs", "?")
        self.add_argument(*args, **kwargs)

    def error(self, message: str):
        if not message.startswith("ambiguous option: "):  # as Beam's parser: never guess a prefix
            super().error(message)


def _normalise_dry_run(argv: list[str]) -> list[str]:
    """Beam's ``--dry_run`` as one of our switches: bare, true/false or 1/0.

    Beam's own flag takes any text and treats every non-empty value as true, so
    ``--dry_run=false`` from a launcher would be a dry run; here it is dropped.
    """
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--dry_run" or arg.startswith("--dry_run="):
            if "=" in arg:
                text = arg.split("=", 1)[1]
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
                text = argv[i]
            else:
                text = "true"
            try:
                if boolean(text):
                    out.append("--dry_run=True")
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"argument --dry_run: {exc}") from None
        else:
            out.append(arg)
        i += 1
    return out


# --- beamvision prepare --------------------------------------------------------


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        required=True,
        metavar="ROOT",
        help="dataset root: a folder per class (ROOT/<class>/...), local or gs://",
    )
    parser.add_argument(
        "--labels",
        metavar="FILE",
        help="instead of class folders: a CSV of uri,label, or a Label Studio JSON export (its "
        "annotations; tasks without one are skipped); relative URIs are under ROOT",
    )
    parser.add_argument("--output", required=True, metavar="PREFIX", help="where TFRecord shards and JSON go")
    parser.add_argument(
        "--image_size",
        type=positive_int,
        required=True,
        metavar="N",
        help="square side the images are decoded and resized to",
    )
    parser.add_argument("--val_fraction", type=fraction, default=0.1, metavar="F", help="default 0.1")
    parser.add_argument("--test_fraction", type=fraction, default=0.1, metavar="F", help="default 0.1")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="salt of the split hash (default 0)")
    _add_decode_arguments(parser)
    _add_worker_arguments(parser, inference=False)
    _add_switch(parser, "--overwrite", "replace a prepared dataset already at --output")
    _add_progress_arguments(parser)


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    input: str
    labels: str | None
    output: str
    image_size: int
    val_fraction: float
    test_fraction: float
    seed: int
    max_pixels: int
    buffer_mb: int
    overwrite: bool
    workers: WorkerSizing = DEFAULT_SIZING
    progress_every: float = DEFAULT_PROGRESS_SECONDS
    detach: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PrepareConfig:
        _check_file_exists("--labels", args.labels)
        if args.val_fraction + args.test_fraction >= 1.0:
            raise UsageError(
                f"--val_fraction {args.val_fraction} --test_fraction {args.test_fraction}: "
                "together they must leave some training data (sum below 1)"
            )
        return cls(
            args.input.rstrip("/"),
            args.labels,
            args.output.rstrip("/"),
            args.image_size,
            args.val_fraction,
            args.test_fraction,
            args.seed,
            args.max_pixels,
            args.buffer_mb,
            args.overwrite,
            _worker_sizing(args),
            args.progress_every,
            args.detach,
        )


# --- beamvision train ----------------------------------------------------------

AUGMENTATIONS = ("flip", "rotate", "zoom", "contrast")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
MONITORS = ("val_accuracy", "val_loss")


def augment_list(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated augmentations, or ``none``."""
    if text == "none":
        return ()
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in names if x not in AUGMENTATIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected 'none' or a comma-separated subset of {','.join(AUGMENTATIONS)}, received {text!r}"
        )
    return names


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="PREFIX", help="output of beamvision prepare")
    _add_architecture_argument(parser)
    parser.add_argument("--output", required=True, metavar="DIR", help="model artifact directory to write")
    parser.add_argument(
        "--input_size",
        type=positive_int,
        metavar="N",
        help="model input side (default: the prepared image_size)",
    )
    parser.add_argument(
        "--weights",
        default="none",
        metavar="{none,imagenet,ARTIFACT,PATH}",
        help="start from random weights, ImageNet weights, an existing artifact (new head "
        "for the new labels) or a weights file for this architecture",
    )
    _add_switch(
        parser,
        "--freeze_base",
        "train only the new classification head (with --weights imagenet or ARTIFACT)",
    )
    parser.add_argument("--epochs", type=positive_int, default=20, metavar="E", help="default 20")
    parser.add_argument(
        "--steps_per_epoch",
        type=positive_int,
        metavar="N",
        help="batches per epoch (default: one pass over the training split)",
    )
    parser.add_argument("--batch_size", type=positive_int, default=64, metavar="B", help="default 64")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="default adam")
    parser.add_argument(
        "--learning_rate",
        type=non_negative_float,
        default=1e-3,
        metavar="LR",
        help="peak learning rate of the warm-up + cosine schedule (default 0.001)",
    )
    parser.add_argument(
        "--augment",
        type=augment_list,
        default=(),
        metavar="LIST",
        help=f"comma-separated subset of {','.join(AUGMENTATIONS)}, or none (default)",
    )
    parser.add_argument(
        "--label_smoothing", type=fraction, default=0.0, metavar="X", help="in [0, 1), default 0"
    )
    parser.add_argument(
        "--early_stopping_patience",
        type=positive_int,
        default=5,
        metavar="P",
        help="epochs without improvement of --monitor before stopping; best weights kept (default 5)",
    )
    parser.add_argument(
        "--monitor",
        choices=MONITORS,
        default="val_accuracy",
        help="validation metric that picks the best epoch and stops early (default val_accuracy)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="default 0")
    _add_artifact_identity_arguments(parser, "training")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: str
    architecture: str
    output: str
    input_size: int | None
    weights: str
    freeze_base: bool
    epochs: int
    steps_per_epoch: int | None
    batch_size: int
    optimizer: str
    learning_rate: float
    augment: tuple[str, ...]
    label_smoothing: float
    early_stopping_patience: int
    monitor: str
    seed: int
    name: str | None
    version: str | None
    overwrite: bool
    engines: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        if args.freeze_base and (
            args.weights == "none"
            or (args.weights != "imagenet" and not storage.exists(storage.join(args.weights, MANIFEST_FILE)))
        ):
            raise UsageError(
                f"--freeze_base: needs --weights imagenet or an artifact to put a new head on "
                f"(--weights {args.weights} is not one)"
            )
        # Without --input_size, train uses the prepared size, checked once the data is read.
        check_model_arguments(args.architecture, input_size=args.input_size, weights=args.weights)
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        values["engines"] = tuple(values["engines"])
        return cls(**{**values, "data": args.data.rstrip("/"), "output": args.output.rstrip("/")})

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "augment": list(self.augment)}


# --- beamvision evaluate -------------------------------------------------------


def _add_results_argument(parser: argparse.ArgumentParser) -> None:
    """--results: a classify output, read by evaluate and export-labels."""
    parser.add_argument(
        "--results", required=True, metavar="DIR", help="output directory of beamvision classify"
    )


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_results_argument(parser)
    parser.add_argument(
        "--truth",
        required=True,
        metavar="{CSV,folders}",
        help="CSV of uri,label, or 'folders': each image's parent folder is its class",
    )
    parser.add_argument(
        "--output", metavar="DIR", help="where metrics.json and the PNG go (default --results)"
    )


# --- beamvision export-labels --------------------------------------------------

EXPORT_FORMATS = ("labelstudio", "csv")


def add_export_labels_arguments(parser: argparse.ArgumentParser) -> None:
    _add_results_argument(parser)
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="labelstudio or csv")
    parser.add_argument("--output", required=True, metavar="FILE", help="the file to write, local or URI")
    parser.add_argument(
        "--queue",
        type=positive_int,
        metavar="N",
        help="only the N images the model is least sure of (lowest top-1 score)",
    )
    parser.add_argument(
        "--from_name", default="choice", metavar="NAME", help="Label Studio Choices tag name (default choice)"
    )
    parser.add_argument(
        "--to_name", default="image", metavar="NAME", help="Label Studio Image tag name (default image)"
    )
    parser.add_argument(
        "--local_files_root",
        metavar="DIR",
        help="Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: local images under it become "
        "/data/local-files/?d=... URLs (without it, local paths are refused for labelstudio)",
    )
    parser.add_argument(
        "--extract_to",
        metavar="DIR",
        help="where archive members are extracted for the tool to open (local, under "
        "--local_files_root, or gs://); needed for members with labelstudio",
    )


# --- beamvision review -----------------------------------------------------------


def add_review_arguments(parser: argparse.ArgumentParser) -> None:
    _add_results_argument(parser)
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="where index.html and its pictures go, local or URI"
    )
    parser.add_argument(
        "--per_label",
        type=positive_int,
        default=12,
        metavar="N",
        help="thumbnails shown per label (default 12)",
    )
    parser.add_argument(
        "--queue",
        type=positive_int,
        default=48,
        metavar="N",
        help="the N least certain images (lowest top-1 score) to review first (default 48)",
    )
    parser.add_argument(
        "--thumbnail_size", type=positive_int, default=160, metavar="PX", help="longer side (default 160)"
    )
    _add_switch(parser, "--overwrite", "replace an earlier report in --output")


# --- beamvision demo -----------------------------------------------------------


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo-output", metavar="DIR", help="default demo-output")
    _add_architecture_argument(parser, default="mobilenet_v2")
    parser.add_argument("--image_size", type=positive_int, default=32, metavar="N", help="default 32")
    parser.add_argument("--epochs", type=positive_int, default=30, metavar="E", help="default 30")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    workdir: str
    architecture: str
    image_size: int
    epochs: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoConfig:
        # The demo trains at the size it prepares.
        check_model_arguments(
            args.architecture, {"input_size": f"--image_size {args.image_size}"}, input_size=args.image_size
        )
        return cls(args.workdir, args.architecture, args.image_size, args.epochs)


# --- beamvision optimize -------------------------------------------------------

QUANTIZATION_PRESETS = ("performance", "mixed")
DEFAULT_CALIBRATION_SIZE = 300


def add_optimize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="MODEL", help="the model artifact to quantise, local or URI"
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="PREFIX",
        help="output of beamvision prepare for this model: its train split calibrates, "
        "its test split measures the accuracy of both models",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="the INT8 model artifact to write, local or URI"
    )
    parser.add_argument(
        "--calibration_size",
        type=positive_int,
        default=DEFAULT_CALIBRATION_SIZE,
        metavar="N",
        help=f"training images that calibrate (default {DEFAULT_CALIBRATION_SIZE}, "
        "or the whole split if it is smaller)",
    )
    parser.add_argument(
        "--preset",
        choices=QUANTIZATION_PRESETS,
        default="performance",
        help="NNCF's quantisation preset: performance (default; symmetric weights and activations) "
        "or mixed (asymmetric activations: can be more accurate where they are not centred on zero)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="which training images calibrate (default 0)"
    )
    parser.add_argument("--name", help="model name recorded in results (default: --model's)")
    parser.add_argument(
        "--version", help="model version recorded in results (default: --model's version + '-int8')"
    )
    _add_switch(parser, "--overwrite", "replace an existing artifact at --output")


@dataclasses.dataclass(frozen=True)
class OptimizeConfig:
    model: str
    data: str
    output: str
    calibration_size: int
    preset: str
    seed: int
    name: str | None
    version: str | None
    overwrite: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OptimizeConfig:
        model, output = args.model.rstrip("/"), args.output.rstrip("/")
        if model == output:
            # The INT8 artifact records the accuracy of its source: the source must stay.
            raise UsageError(f"--output {args.output}: is --model; write the INT8 artifact to a new place")
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, "model": model, "data": args.data.rstrip("/"), "output": output})


# --- beamvision tune -----------------------------------------------------------

SEARCHES = ("grid", "random")
DEFAULT_RANDOM_TRIALS = 10
# Train flags a search space may not set, and why: tune sets them for every trial.
TUNE_RESERVED = {
    "data": "set by tune's --data",
    "output": "tune writes each trial's artifact under --output",
    "monitor": "set by tune's --metric",
    "name": "the best trial's artifact is named by its architecture",
    "version": "each trial's artifact is versioned by its training time",
    "overwrite": "tune's --overwrite starts a search afresh",
    "quiet": "a flag of tune's own run, not of its trials",
    "verbose": "a flag of tune's own run, not of its trials",
}


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="PREFIX", help="output of beamvision prepare")
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="where trials.parquet, summary.json, plot.png, best/ and each trial's files go",
    )
    parser.add_argument(
        "--space",
        required=True,
        metavar="FILE",
        help="YAML or JSON file of train flags: a value, a list of values, or {low, high, log, num}",
    )
    parser.add_argument(
        "--search", choices=SEARCHES, default="random", help="grid: every combination; random (default)"
    )
    parser.add_argument(
        "--trials",
        type=positive_int,
        metavar="N",
        help=f"trials to run (default: {DEFAULT_RANDOM_TRIALS} random ones, or the whole grid)",
    )
    parser.add_argument(
        "--metric",
        choices=MONITORS,
        default="val_accuracy",
        help="validation metric that ranks trials and stops them early (default val_accuracy)",
    )
    parser.add_argument(
        "--rungs",
        type=positive_int,
        default=2,
        metavar="R",
        help="successive halving: trials are ranked after E/F^(R-1), ..., E/F epochs (E: the longest "
        "trial's) and only the best 1/F go on (default 2: at half; 1 runs every trial to the end)",
    )
    parser.add_argument(
        "--reduction_factor",
        type=_checked_number(int, lambda v: v >= 2, "an integer of at least 2"),
        default=2,
        metavar="F",
        help="the F of --rungs (default 2: the best half goes on)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="draws the random trials; each trial's train seed"
    )
    _add_switch(parser, "--overwrite", "start afresh: delete the trials already in --output")


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    data: str
    output: str
    space: str
    search: str
    trials: int | None
    metric: str
    rungs: int
    reduction_factor: int
    seed: int
    overwrite: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TuneConfig:
        _check_file_exists("--space", args.space)
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        if args.search == "random" and args.trials is None:
            values["trials"] = DEFAULT_RANDOM_TRIALS
        return cls(**{**values, "data": args.data.rstrip("/"), "output": args.output.rstrip("/")})


def train_flag_argv(flags: dict) -> list[str]:
    """``beamvision train`` argv for flags given as values (a space file's, a trial's)."""
    argv = []
    for flag, value in flags.items():
        if isinstance(value, bool):
            argv.append(f"--{flag}={'true' if value else 'false'}")
        elif isinstance(value, list | tuple):
            argv += [f"--{flag}", ",".join(map(str, value)) or "none"]
        else:
            argv += [f"--{flag}", str(value)]
    return argv


def train_config(flags: dict) -> TrainConfig:
    """The TrainConfig of train flags given as values, checked as ``beamvision train`` checks its argv.

    Raises:
        UsageError: naming the flag and value that train refuses.
    """
    args = parse("beamvision train", "", add_train_arguments, train_flag_argv(flags))
    return TrainConfig.from_args(args)


def train_defaults() -> dict:
    """Every flag of ``beamvision train`` (without dashes) and its default."""
    required = ["--data", "d", "--architecture", list_models()[0], "--output", "o"]
    defaults = vars(parse("beamvision train", "", add_train_arguments, required))
    return {**defaults, "data": None, "architecture": None, "output": None}
