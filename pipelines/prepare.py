"""``beamvision prepare``: labelled images to split TFRecord shards for training.

    beamvision prepare --input gs://bucket/flowers --output gs://bucket/data/flowers --image_size 224

Input is a folder per class (``ROOT/<class>/...``), a CSV of ``uri,label`` or
a Label Studio JSON export of reviewed tasks (``--labels tasks.json``: each
task's annotation gives its label; see ``beamvision.pipelines.labelstudio``).
Archives (.tar, .tar.gz, .zip) under ROOT, or ROOT itself an archive, give
their members' classes by the member's first folder inside the archive
(``cats/1.jpg``); a CSV may name members, ``ARCHIVE!/path/in/archive.jpg``.
Images are decoded by ``decode_image`` (the function classify uses), assigned
to train/val/test by a hash of their path under ROOT (stable across reruns and
runners), a class of 3 images or more keeping one in each split (a few files
moved: ``_SplitEveryClass``), and written as TFRecord shards with labels.json
and stats.json (see ``beamvision.models.dataset``). ``--classes FILE`` keeps
classes that have no image. Bad images become error rows; they never stop the job.

With ``--multi_label`` an image may hold several labels: a CSV naming one URI
on several rows, or a Label Studio task with several choices, gives the image
the set of its distinct labels (without the flag that is a ConflictingLabels
error row); a class folder gives a set of one. The TFRecords then carry each
image's label indices, stats.json says ``"multi_label": true``, its per-class
counts count an image once in each of its classes, and the splits keep every
label combination (as a single-label run keeps every class) in each split.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys

import apache_beam as beam
from apache_beam.runners.runner import PipelineResult

from beamvision import storage
from beamvision.console import DEFAULT_PROGRESS_SECONDS, counted
from beamvision.models.dataset import (
    LABELS_FILE,
    SPLITS,
    STATS_FILE,
    add_to_split_summary,
    assign_split,
    classes_missing_from_splits,
    empty_split_summary,
    folder_label,
    merge_split_summaries,
    missing_split_warnings,
    relative_key,
    serialize_example,
    shard_prefix,
    split_overrides,
    split_position,
)
from beamvision.models.errors import ModelError
from beamvision.models.labels import read_labels_file
from beamvision.pipelines.flags import (
    DEFAULT_MAX_ERROR_RATE,
    UsageError,
    add_decode_arguments,
    add_error_rate_argument,
    add_progress_arguments,
    add_switch,
    add_worker_arguments,
    check_file_exists,
    fraction,
    parse_pipeline_args,
    positive_int,
    worker_sizing,
)
from beamvision.pipelines.labelstudio import is_label_studio_export, label_studio_labels
from beamvision.pipelines.launch import Job, check_errors, is_dry_run, run_job
from beamvision.pipelines.reports import command, empty_classes_warning, format_prepared
from beamvision.transforms.archives import CountedInputs, GroupArchives, ListArchiveMembers, SplitArchives
from beamvision.transforms.concurrency import MB
from beamvision.transforms.decode import DecodeImages
from beamvision.transforms.outputs import ERRORS_PREFIX, errors_pattern
from beamvision.transforms.progress import ReportProgress
from beamvision.transforms.read import ImageFile, LookUpFiles, MatchInputs, ReadFiles, listed_uri
from beamvision.transforms.rows import ERRORS_TAG, Label, error_row, label_set
from beamvision.transforms.runners import new_pipeline
from beamvision.transforms.sizing import DEFAULT_SIZING, WorkerSizing
from beamvision.transforms.write import SummarizeErrors, WriteErrors

# Every file a prepare run writes under --output.
OUTPUTS = [f"{split}-*.tfrecord" for split in SPLITS] + [f"{ERRORS_PREFIX}-*", LABELS_FILE, STATS_FILE]
MULTI_LABEL_FLAG = "--multi_label"


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
        "annotations; tasks without one are skipped); relative URIs are from the current directory",
    )
    parser.add_argument(
        "--classes",
        metavar="FILE",
        help="every class of the dataset, kept even with no image: one name a line, or a JSON list "
        "(a labels.json); classes with images but not in it are added",
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
    add_decode_arguments(parser)
    add_worker_arguments(parser, inference=False)
    add_switch(
        parser,
        MULTI_LABEL_FLAG,
        "an image may hold several labels: a CSV naming a URI on several rows, or a Label Studio task "
        "with several choices, gives it that label set (train then fits a sigmoid head)",
    )
    add_switch(parser, "--overwrite", "replace a prepared dataset already at --output")
    add_error_rate_argument(parser)
    add_progress_arguments(parser)


@dataclasses.dataclass(frozen=True)
class Config:
    input: str
    labels: str | None
    classes: str | None
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
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    multi_label: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        check_file_exists("--labels", args.labels)
        check_file_exists("--classes", args.classes)
        if args.val_fraction + args.test_fraction >= 1.0:
            raise UsageError(
                f"--val_fraction {args.val_fraction} --test_fraction {args.test_fraction}: "
                "together they must leave some training data (sum below 1)"
            )
        return cls(
            storage.canonical(args.input.rstrip("/")),
            args.labels,
            args.classes,
            args.output.rstrip("/"),
            args.image_size,
            args.val_fraction,
            args.test_fraction,
            args.seed,
            args.max_pixels,
            args.buffer_mb,
            args.overwrite,
            worker_sizing(args),
            args.progress_every,
            args.detach,
            args.max_error_rate,
            args.multi_label,
        )


def build_pipeline(
    pipeline: beam.Pipeline,
    config: Config,
    reviewed: list[tuple[str, tuple[str, ...]]] | None = None,
    unannotated: int | None = None,
    classes: list[str] = (),
) -> None:
    """Adds the prepare steps for ``config`` to ``pipeline``.

    ``reviewed``: (uri, choices) of each task of a Label Studio export given as
    ``--labels`` (``label_studio_labels``), with ``unannotated`` tasks skipped.
    ``classes``: classes to keep even without an image (``--classes``, and
    those a Label Studio export records); labels.json is every class named.

    Every file's class is known from its URI (folder) or the labels file
    before any file is read, so the class list is ready before decoding
    starts and the pixels flow through one fused stage (read, decode,
    serialise, write): memory does not grow with the dataset. An archive's
    classes are its members' folders: a names-only pass reads each archive
    before the pass that decodes (for tar.gz and zip, which cannot skip
    data, archives are read twice).
    """
    labelled = (
        _labelled_by_file(pipeline, config, reviewed)
        if config.labels
        else _labelled_by_folder(pipeline, config)
    )
    kept = pipeline | "KeptClasses" >> beam.Create(sorted(classes))
    class_names = beam.pvalue.AsSingleton(
        (labelled["named_classes"], kept)
        | "EveryClass" >> beam.Flatten()
        | "DistinctClasses" >> beam.Distinct()
        | "SortedClasses" >> beam.combiners.ToList()
        | "Sort" >> beam.Map(sorted)
    )
    # A stage boundary on file names only, so that the read-to-write stage fuses whole.
    sizing = config.workers.for_pipeline(pipeline)
    found = labelled["files"] | "SpreadReads" >> beam.Reshuffle() | "LookUpFiles" >> LookUpFiles(sizing)
    archives = labelled["archives"] | "GroupArchives" >> GroupArchives()
    # Names of files and archives meet before the read: bytes never cross a stage boundary.
    requests = (found["files"], archives) | "FilesAndArchives" >> beam.Flatten()
    read = requests | "ReadFiles" >> ReadFiles(
        config.buffer_mb * MB, label_from_folder=not config.labels, sizing=sizing
    )
    decoded = read["files"] | "DecodeImages" >> DecodeImages(
        config.image_size, config.max_pixels, config.buffer_mb, sizing
    )
    overrides = beam.pvalue.AsDict(labelled["labelled"] | "SplitEveryClass" >> _SplitEveryClass(config))
    examples = decoded["images"] | "ToExamples" >> beam.Map(_to_example, class_names, overrides, config)
    written = _write_splits(examples, config.output)
    error_parts = {
        "found": found["errors"],
        "read": read["errors"],
        "decoded": decoded["errors"],
        "labelled": labelled["errors"],
    }
    errors = list(error_parts.values()) | "AllErrors" >> beam.Flatten()
    _ = examples | "ProgressResults" >> ReportProgress("results")
    _ = error_parts | "ProgressErrors" >> ReportProgress("errors")
    counted = {"named": labelled["inputs"], "unpacked": read["members"], "refused": labelled["errors"]}
    inputs = counted | "CountedInputs" >> CountedInputs()
    written.append(errors | "WriteErrorShards" >> WriteErrors(config.output))
    _write_stats(pipeline, config, unannotated, class_names, examples, inputs, errors, written)


def _labelled_by_file(
    pipeline: beam.Pipeline, config: Config, reviewed: list[tuple[str, tuple[str, ...]]] | None
) -> dict:
    """The files a labels CSV or a Label Studio export names, each with its one label (or label set).

    Returns a dict of PCollections: ``inputs`` (each URI named), ``files``
    (labelled ImageFiles), ``archives`` (archives to read members of),
    ``errors`` (files without one label) and ``named_classes``.
    """
    if reviewed is not None:
        pairs = pipeline | "ReviewedLabels" >> beam.Create(
            [(uri, label) for uri, chosen in reviewed for label in chosen]
        )
    else:
        pairs = (
            pipeline
            | "ReadLabelCsv" >> beam.io.ReadFromText(config.labels)
            | "ParseLabels" >> beam.FlatMap(_csv_entry)
        )
    entries = pairs | "OncePerUri" >> beam.GroupByKey()
    source = "the CSV" if reviewed is None else "the Label Studio export"
    labelled = entries | "Label" >> beam.ParDo(_CsvLabelFn(config.multi_label, source)).with_outputs(
        ERRORS_TAG, main="files"
    )
    split = labelled.files | "SplitArchives" >> SplitArchives()
    return {
        "inputs": entries | "InputUris" >> beam.Keys(),
        "files": split["files"],
        "archives": split["archives"],
        "errors": labelled[ERRORS_TAG],
        "labelled": labelled.files,
        "named_classes": labelled.files | "ClassNames" >> beam.FlatMap(lambda f: label_set(f.label)),
    }


def _labelled_by_folder(pipeline: beam.Pipeline, config: Config) -> dict:
    """The files under ROOT, each labelled by its class folder (an archive's members by theirs).

    Returns the dict of PCollections ``_labelled_by_file`` returns.
    """
    matched = pipeline | "MatchInputs" >> MatchInputs([config.input])
    split = matched["files"] | "SplitArchives" >> SplitArchives()
    foldered = split["files"] | "Label" >> beam.ParDo(_FolderLabelFn(config.input)).with_outputs(
        ERRORS_TAG, main="files"
    )
    # An archive's classes are its members' folders: a listing pass (names only) before the read.
    listed = split["archives"] | "GroupToList" >> GroupArchives() | "ListArchives" >> ListArchiveMembers()
    every = (foldered.files, listed) | "Labelled" >> beam.Flatten()
    return {
        "inputs": matched["inputs"],
        "files": foldered.files,
        "archives": split["archives"],
        "errors": foldered[ERRORS_TAG],
        "labelled": every,
        "named_classes": every | "ClassNames" >> beam.FlatMap(lambda f: label_set(f.label)),
    }


def _write_splits(examples, output: str) -> list:
    """Writes each split's examples as TFRecord shards; returns the PCollections of file names written."""
    per_split = examples | "BySplit" >> beam.Partition(lambda e, _: SPLITS.index(e[0]), len(SPLITS))
    return [
        per_split[i]
        | f"Serialized{split.title()}" >> beam.Map(lambda e: e[2])
        | f"Write{split.title()}"
        >> beam.io.WriteToTFRecord(shard_prefix(output, split), file_name_suffix=".tfrecord")
        for i, split in enumerate(SPLITS)
    ]


def _write_stats(
    pipeline, config: Config, unannotated, class_names, examples, inputs, errors, written
) -> None:
    """labels.json and stats.json, once every shard is written (``written``: their file names)."""
    count = beam.combiners.Count
    _ = (
        pipeline
        | "StatsTrigger" >> beam.Create([None])
        | "WriteLabelsAndStats"
        >> beam.ParDo(
            _WriteStatsFn(config, unannotated),
            class_names=class_names,
            counts=beam.pvalue.AsList(
                examples
                | "SplitAndClass" >> beam.FlatMap(lambda e: [(e[0], name) for name in e[1]])
                | "CountPerClass" >> count.PerElement()
            ),
            split_totals=beam.pvalue.AsList(
                examples | "Split" >> beam.Map(lambda e: e[0]) | "CountPerSplit" >> count.PerElement()
            ),
            inputs=beam.pvalue.AsSingleton(inputs | "CountInputs" >> count.Globally()),
            errors=beam.pvalue.AsSingleton(errors | "CountErrors" >> count.Globally()),
            error_groups=beam.pvalue.AsSingleton(errors | "SummarizeErrors" >> SummarizeErrors()),
            files=beam.pvalue.AsList(written | "AllWritten" >> beam.Flatten()),
        )
    )


def _csv_entry(line: str):
    """A labels CSV line to (canonical uri, label); the label is "" when the line names none."""
    uris = listed_uri(line, is_csv=True)
    fields = next(csv.reader([line]), [])
    if uris:
        yield uris[0], fields[1].strip() if len(fields) >= 2 else ""


@dataclasses.dataclass(frozen=True)
class LabelProblem:
    """Why a labels file gives a file no label: its error row's type and message."""

    error_type: str
    message: str


def file_label(labels, multi_label: bool, source: str = "the CSV") -> Label | LabelProblem:
    """The label the labels-file entries of one file give it, or the problem when none fits.

    ``labels``: the label of each entry naming the file ("" for none). One
    distinct label is the file's label; several are its label set (a sorted
    tuple) under ``--multi_label`` and conflicting labels otherwise.
    ``source`` names the labels file in the problem's message.
    """
    distinct = sorted({label for label in labels if label})
    if not distinct:
        return LabelProblem("NoLabel", f"file has no label in {source}")
    if multi_label:
        return tuple(distinct)
    if len(distinct) == 1:
        return distinct[0]
    return LabelProblem(
        "ConflictingLabels",
        f"{source} gives this file {len(distinct)} labels: {', '.join(distinct)} "
        f"(pass {MULTI_LABEL_FLAG} if an image may hold several)",
    )


class _CsvLabelFn(beam.DoFn):
    """(uri, labels from every CSV line naming it) to an ImageFile with its label, or an error row."""

    def __init__(self, multi_label: bool, source: str):
        self._multi_label, self._source = multi_label, source

    def process(self, element):
        uri, labels = element
        label = file_label(labels, self._multi_label, self._source)
        if isinstance(label, LabelProblem):
            yield beam.pvalue.TaggedOutput(
                ERRORS_TAG, error_row(uri, "label", label.error_type, label.message)
            )
        else:
            yield ImageFile(uri, label=label)


class _FolderLabelFn(beam.DoFn):
    """An ImageFile under ROOT to the same with its class folder as label; files at the root to error rows."""

    def __init__(self, root: str):
        self._root = root

    def process(self, image_file: ImageFile):
        label = folder_label(image_file.uri, self._root)
        if label:
            yield dataclasses.replace(image_file, label=label)
        else:
            yield beam.pvalue.TaggedOutput(
                ERRORS_TAG, error_row(image_file.uri, "label", "NoLabel", "file is not inside a class folder")
            )


class _SplitEveryClass(beam.PTransform):
    """Labelled ImageFiles (names only, before any read) to (key, split) for the few files moved.

    Each file's split is its hash's (``assign_split``) unless its class needs
    it elsewhere so that every split holds the class (``split_overrides``).
    Under ``--multi_label`` the group is the file's label set: every label
    combination of 3 images or more is in each split (so each of its classes
    is), and no file is pulled two ways by two of its classes.
    A combiner per class keeps only counts and the few files at the ends of
    each split, never the class's whole list, so this stays small however
    many files a class has; the result (at most a few files per class) is a
    side input of the fused read-to-write stage.
    """

    def __init__(self, config: Config):
        super().__init__()
        self._config = config

    def expand(self, files):
        config = self._config

        def placed(image_file: ImageFile) -> tuple[Label, tuple[float, str]]:  # a label set, multi-label
            key = relative_key(image_file.uri, config.input)
            return image_file.label, (split_position(key, config.seed), key)

        return (
            files
            | "Placed" >> beam.Map(placed)
            | "PerClass" >> beam.CombinePerKey(_SplitSummaryFn((config.val_fraction, config.test_fraction)))
            | "Moved"
            >> beam.FlatMap(
                lambda entry: sorted(
                    split_overrides(entry[1], (config.val_fraction, config.test_fraction)).items()
                )
            )
        )


class _SplitSummaryFn(beam.CombineFn):
    """A class's (position, key) pairs to its ``SplitSummary`` (counts and the ends of each split)."""

    def __init__(self, fractions: tuple[float, float]):
        self._fractions = fractions

    def create_accumulator(self):
        return empty_split_summary()

    def add_input(self, accumulator, entry):
        return add_to_split_summary(accumulator, entry, self._fractions)

    def merge_accumulators(self, accumulators):
        return merge_split_summaries(accumulators)

    def extract_output(self, accumulator):
        return accumulator


def _to_example(
    element, class_names: list[str], overrides: dict[str, str], config: Config
) -> tuple[str, tuple[str, ...], bytes]:
    """(ImageKey, pixels) to (split, its class names, serialized tf.train.Example).

    The example's label is the class's index, or under ``--multi_label`` the
    indices of the image's label set (a class folder's: a set of one).
    """
    key, pixels = element
    relative = relative_key(key.uri, config.input)
    split = overrides.get(relative) or assign_split(
        relative, config.val_fraction, config.test_fraction, config.seed
    )
    names = label_set(key.label)
    index = (
        [class_names.index(name) for name in names] if config.multi_label else class_names.index(key.label)
    )
    return split, names, serialize_example(pixels, index, key.uri)


def _asked_splits(config: Config) -> list[str]:
    """The held-out splits asked for (a fraction above 0): only these are filled for every class."""
    return [
        split
        for split, fraction in (("val", config.val_fraction), ("test", config.test_fraction))
        if fraction
    ]


class _WriteStatsFn(beam.DoFn):
    def __init__(self, config: Config, unannotated: int | None):
        self._config = config
        self._unannotated = unannotated

    def process(self, _, class_names, counts, split_totals, inputs, errors, error_groups, files):
        config = self._config
        per_split = {split: {name: 0 for name in class_names} for split in SPLITS}
        for (split, name), n in counts:
            per_split[split][name] = n
        totals = {split: 0 for split in SPLITS} | dict(split_totals)  # images (a set counts once)
        stats = {
            "input": config.input,
            "image_size": config.image_size,
            "val_fraction": config.val_fraction,
            "test_fraction": config.test_fraction,
            "seed": config.seed,
            "inputs": inputs,
            "examples": sum(totals.values()),
            "errors": errors,
            "totals": totals,
            # Images per class: under --multi_label, an image counts in each of its classes.
            "counts": per_split,
            # Named by a folder or the CSV, but none of their files became an example.
            "empty_classes": [name for name in class_names if not any(per_split[s][name] for s in SPLITS)],
            # Classes with examples, but none in this split (too few images, or images that failed).
            "missing_from_splits": classes_missing_from_splits(
                class_names, per_split, ["train", *_asked_splits(config)]
            ),
            "error_groups": error_groups,
        }
        if config.multi_label:  # a single-label stats.json is written as before
            stats["multi_label"] = True
        if self._unannotated is not None:  # --labels was a Label Studio export
            stats["unannotated_tasks"] = self._unannotated
        storage.write_atomic(
            storage.join(config.output, LABELS_FILE), json.dumps(class_names, indent=1).encode()
        )
        storage.write_atomic(storage.join(config.output, STATS_FILE), json.dumps(stats, indent=2).encode())
        yield stats


def _read_classes(uri: str) -> list[str]:
    """``--classes``: a JSON list of names (a labels.json) or a label file, one name a line."""
    if uri.lower().endswith(".json"):
        try:
            names = json.loads(storage.read_text(uri))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"--classes {uri}: not a JSON list of class names ({exc})") from None
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise UsageError(f"--classes {uri}: not a JSON list of class names")
        return names
    try:
        return read_labels_file(uri)
    except ModelError as exc:
        raise UsageError(f"--classes: {exc}") from None


def run(argv: list[str] | None = None) -> PipelineResult | None:
    """Runs prepare and prints what it wrote; with --dry_run, only builds the job graph (see classify)."""
    args, pipeline_options = parse_pipeline_args(
        "beamvision prepare", __doc__.splitlines()[0], add_arguments, argv
    )
    config = Config.from_args(args)
    if not is_dry_run(pipeline_options):  # workers match the input, retrying an unreachable host for minutes
        storage.check_reachable(config.input)
    reviewed = unannotated = None
    classes = set(_read_classes(config.classes)) if config.classes else set()
    if config.labels and is_label_studio_export(config.labels):
        try:
            text = storage.read_text(config.labels)
        except UnicodeDecodeError:
            raise UsageError(f"--labels {config.labels}: not UTF-8 text") from None
        export = label_studio_labels(text, config.input)
        reviewed, unannotated = export.labelled, export.unannotated
        classes.update(export.classes)
        recorded = f"; {len(export.classes):,} classes recorded" if export.classes else ""
        print(
            f"{config.labels}: {counted(len(reviewed), 'annotated task')}, "
            f"{unannotated:,} without a choice annotation (skipped){recorded}"
        )
    pipeline = new_pipeline(pipeline_options)
    # Before any deletion: building can still fail.
    build_pipeline(pipeline, config, reviewed, unannotated, sorted(classes))
    # Stale shards of an earlier run (another shard count) would be read by train.
    job = Job(
        "prepare",
        config.output,
        OUTPUTS,
        "a prepared dataset",
        STATS_FILE,
        config.overwrite,
        config.progress_every,
        config.detach,
    )
    source = f"--labels {config.labels}" if config.labels else f"--input {config.input}"
    outcome = run_job(pipeline, pipeline_options, job, f"{source}: names no file; nothing was prepared")
    stats = outcome.report
    if stats is not None:
        for line in format_prepared(stats, config.output):
            print(line)
        for warning in (empty_classes_warning(stats), *missing_split_warnings(stats["missing_from_splits"])):
            if warning:
                print(warning, file=sys.stderr)
        check_errors(stats, config.max_error_rate, errors_pattern(config.output))
        train = command(
            "train", "--data", config.output, "--architecture", "mobilenet_v2", "--output", "MODEL_DIR"
        )
        print(f"next: {train} (every architecture: beamvision models)")
    return outcome.result
