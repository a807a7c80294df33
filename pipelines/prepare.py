"""``beamvision prepare``: labelled images to split TFRecord shards for training.

    beamvision prepare --input gs://bucket/flowers --output gs://bucket/data/flowers --image_size 224

Input is a folder per class (``ROOT/<class>/...``), a CSV of ``uri,label`` or
a Label Studio JSON export of reviewed tasks (``--labels tasks.json``: each
task's annotation is its label; see ``label_studio_labels``).
Archives (.tar, .tar.gz, .zip) under ROOT, or ROOT itself an archive, give
their members' classes by the member's first folder inside the archive
(``cats/1.jpg``); a CSV may name members, ``ARCHIVE!/path/in/archive.jpg``.
Images are decoded by ``decode_image`` (the function classify uses), assigned
to train/val/test by a hash of their path under ROOT (stable across reruns and
runners), and written as TFRecord shards with labels.json and stats.json (see
``beamvision.models.dataset``). Bad images become error rows; they never stop the job.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import urllib.parse

import apache_beam as beam
from apache_beam.runners.runner import PipelineResult

from beamvision import storage
from beamvision.models.dataset import (
    LABELS_FILE,
    SPLITS,
    STATS_FILE,
    assign_split,
    folder_label,
    relative_key,
    serialize_example,
    shard_prefix,
)
from beamvision.pipelines import options
from beamvision.pipelines.export_labels import LOCAL_FILES_URL
from beamvision.transforms.archives import CountedInputs, GroupArchives, ListArchiveMembers, SplitArchives
from beamvision.transforms.concurrency import MB
from beamvision.transforms.decode import DecodeImages
from beamvision.transforms.outputs import ERRORS_PREFIX
from beamvision.transforms.progress import ReportProgress, run_with_progress
from beamvision.transforms.read import ImageFile, LookUpFiles, MatchInputs, ReadFiles, listed_uri
from beamvision.transforms.rows import ERRORS_TAG, error_row
from beamvision.transforms.write import SummarizeErrors, WriteErrors, format_error_groups

# Every file a prepare run writes under --output.
OUTPUTS = [f"{split}-*.tfrecord" for split in SPLITS] + [f"{ERRORS_PREFIX}-*", LABELS_FILE, STATS_FILE]


def build_pipeline(
    pipeline: beam.Pipeline,
    config: options.PrepareConfig,
    reviewed: list[tuple[str, str]] | None = None,
    unannotated: int | None = None,
) -> None:
    """Adds the prepare steps for ``config`` to ``pipeline``.

    ``reviewed``: (uri, label) pairs of a Label Studio export given as
    ``--labels`` (``label_studio_labels``), with ``unannotated`` tasks skipped.

    Every file's class is known from its URI (folder) or the labels file
    before any file is read, so the class list is ready before decoding
    starts and the pixels flow through one fused stage (read, decode,
    serialise, write): memory does not grow with the dataset. An archive's
    classes are its members' folders: a names-only pass reads each archive
    before the pass that decodes (for tar.gz and zip, which cannot skip
    data, archives are read twice).
    """
    if config.labels:
        if reviewed is not None:
            pairs = pipeline | "ReviewedLabels" >> beam.Create(reviewed)
        else:
            pairs = (
                pipeline
                | "ReadLabelCsv" >> beam.io.ReadFromText(config.labels)
                | "ParseLabels" >> beam.FlatMap(_csv_entry, config.input)
            )
        entries = pairs | "OncePerUri" >> beam.GroupByKey()
        inputs = entries | "InputUris" >> beam.Keys()
        labelled = entries | "Label" >> beam.ParDo(_CsvLabelFn()).with_outputs(ERRORS_TAG, main="files")
        split = labelled.files | "SplitArchives" >> SplitArchives()
        files, label_errors = split["files"], labelled[ERRORS_TAG]
        named_classes = labelled.files | "ClassNames" >> beam.Map(lambda f: f.label)
    else:
        matched = pipeline | "MatchInputs" >> MatchInputs([config.input])
        inputs = matched["inputs"]
        split = matched["files"] | "SplitArchives" >> SplitArchives()
        foldered = split["files"] | "Label" >> beam.ParDo(_FolderLabelFn(config.input)).with_outputs(
            ERRORS_TAG, main="files"
        )
        files, label_errors = foldered.files, foldered[ERRORS_TAG]
        # An archive's classes are its members' folders: a listing pass (names only) before the read.
        listed = split["archives"] | "GroupToList" >> GroupArchives() | "ListArchives" >> ListArchiveMembers()
        named_classes = (
            (files, listed) | "Labelled" >> beam.Flatten() | "ClassNames" >> beam.Map(lambda f: f.label)
        )
    class_names = beam.pvalue.AsSingleton(
        named_classes
        | "DistinctClasses" >> beam.Distinct()
        | "SortedClasses" >> beam.combiners.ToList()
        | "Sort" >> beam.Map(sorted)
    )
    # A stage boundary on file names only, so that the read-to-write stage fuses whole.
    sizing = config.workers.for_pipeline(pipeline)
    found = files | "SpreadReads" >> beam.Reshuffle() | "LookUpFiles" >> LookUpFiles(sizing)
    archives = split["archives"] | "GroupArchives" >> GroupArchives()
    # Names of files and archives meet before the read: bytes never cross a stage boundary.
    requests = (found["files"], archives) | "FilesAndArchives" >> beam.Flatten()
    read = requests | "ReadFiles" >> ReadFiles(
        config.buffer_mb * MB, label_from_folder=not config.labels, sizing=sizing
    )
    decoded = read["files"] | "DecodeImages" >> DecodeImages(
        config.image_size, config.max_pixels, config.buffer_mb, sizing
    )
    examples = decoded["images"] | "ToExamples" >> beam.Map(_to_example, class_names, config)
    per_split = examples | "BySplit" >> beam.Partition(lambda e, _: SPLITS.index(e[0]), len(SPLITS))
    written = [
        per_split[i]
        | f"Serialized{split.title()}" >> beam.Map(lambda e: e[2])
        | f"Write{split.title()}"
        >> beam.io.WriteToTFRecord(shard_prefix(config.output, split), file_name_suffix=".tfrecord")
        for i, split in enumerate(SPLITS)
    ]
    error_parts = {
        "found": found["errors"],
        "read": read["errors"],
        "decoded": decoded["errors"],
        "labelled": label_errors,
    }
    errors = list(error_parts.values()) | "AllErrors" >> beam.Flatten()
    _ = examples | "ProgressResults" >> ReportProgress("results")
    _ = error_parts | "ProgressErrors" >> ReportProgress("errors")
    counted = {"named": inputs, "unpacked": read["members"], "refused": label_errors}
    inputs = counted | "CountedInputs" >> CountedInputs()
    written.append(errors | "WriteErrorShards" >> WriteErrors(config.output))
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
                | "SplitAndClass" >> beam.Map(lambda e: (e[0], e[1]))
                | "CountPerClass" >> count.PerElement()
            ),
            inputs=beam.pvalue.AsSingleton(inputs | "CountInputs" >> count.Globally()),
            errors=beam.pvalue.AsSingleton(errors | "CountErrors" >> count.Globally()),
            error_groups=beam.pvalue.AsSingleton(errors | "SummarizeErrors" >> SummarizeErrors()),
            files=beam.pvalue.AsList(written | "AllWritten" >> beam.Flatten()),
        )
    )


def is_label_studio_export(uri: str) -> bool:
    """Whether ``--labels`` names a Label Studio JSON export (by its name) rather than a CSV."""
    return uri.lower().endswith(".json")


def label_studio_labels(text: str, root: str) -> tuple[list[tuple[str, str]], int]:
    """(uri, label) per annotated task of a Label Studio JSON export, and how many had no annotation.

    The label is the first choice of the task's latest annotation that was
    not cancelled: a person's label overrides the model's prediction, and a
    task nobody annotated is skipped (and counted). The image is the task's
    ``source_uri`` (which ``export-labels`` sets: a file, a ``gs://`` object
    or an archive member) or else its ``image``: a storage URI, or a
    local-files URL, taken relative to ROOT.

    Raises:
        options.UsageError: the text is not a Label Studio JSON export.
    """
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as exc:
        raise options.UsageError(f"--labels: not JSON ({exc})") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and "data" in t for t in tasks):
        raise options.UsageError(
            "--labels: not a Label Studio JSON export (a list of tasks with data and annotations; "
            "export with the JSON format, not JSON_MIN)"
        )
    labelled, unannotated = [], 0
    for number, task in enumerate(tasks, 1):
        try:
            label = _annotated_choice(task.get("annotations") or [])
            uri = _task_uri(task["data"], root)
        except (AttributeError, TypeError, ValueError) as exc:
            raise options.UsageError(f"--labels: task {number} is not a Label Studio task ({exc})") from None
        if label is None or uri is None:
            unannotated += 1
        else:
            labelled.append((uri, label))
    return labelled, unannotated


def _annotated_choice(annotations: list[dict]) -> str | None:
    kept = [a for a in annotations if not a.get("was_cancelled")]
    for annotation in sorted(kept, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0), reverse=True):
        for result in annotation.get("result") or []:
            choices = (result.get("value") or {}).get("choices") or []
            if result.get("type") == "choices" and choices:
                return str(choices[0])
    return None


def _task_uri(data: dict, root: str) -> str | None:
    uri = data.get("source_uri") or data.get("image")
    if not isinstance(uri, str) or not uri:
        return None
    if uri.startswith(LOCAL_FILES_URL):
        uri = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query).get("d", [""])[0]
    named = listed_uri(uri, root=root)  # a relative path is under ROOT, as in a labels CSV
    return named[0] if named else None


def _csv_entry(line: str, root: str):
    """A labels CSV line to (uri, label); the label is "" when the line names none."""
    uris = listed_uri(line, is_csv=True, root=root)
    fields = next(csv.reader([line]), [])
    if uris:
        yield uris[0], fields[1].strip() if len(fields) >= 2 else ""


class _CsvLabelFn(beam.DoFn):
    """(uri, labels from every CSV line naming it) to an ImageFile with its one label, or an error row."""

    def process(self, element):
        uri, labels = element
        distinct = sorted({label for label in labels if label})
        if len(distinct) == 1:
            yield ImageFile(uri, label=distinct[0])
        elif not distinct:
            yield beam.pvalue.TaggedOutput(
                ERRORS_TAG, error_row(uri, "label", "NoLabel", "file has no label in the CSV")
            )
        else:
            message = f"the CSV gives this file {len(distinct)} labels: {', '.join(distinct)}"
            yield beam.pvalue.TaggedOutput(ERRORS_TAG, error_row(uri, "label", "ConflictingLabels", message))


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


def _to_example(element, class_names: list[str], config: options.PrepareConfig) -> tuple[str, str, bytes]:
    """(ImageKey, pixels) to (split, class name, serialized tf.train.Example)."""
    key, pixels = element
    split = assign_split(
        relative_key(key.uri, config.input), config.val_fraction, config.test_fraction, config.seed
    )
    return split, key.label, serialize_example(pixels, class_names.index(key.label), key.uri)


class _WriteStatsFn(beam.DoFn):
    def __init__(self, config: options.PrepareConfig, unannotated: int | None):
        self._config = config
        self._unannotated = unannotated

    def process(self, _, class_names, counts, inputs, errors, error_groups, files):
        config = self._config
        per_split = {split: {name: 0 for name in class_names} for split in SPLITS}
        for (split, name), n in counts:
            per_split[split][name] = n
        stats = {
            "input": config.input,
            "image_size": config.image_size,
            "val_fraction": config.val_fraction,
            "test_fraction": config.test_fraction,
            "seed": config.seed,
            "inputs": inputs,
            "examples": sum(n for _, n in counts),
            "errors": errors,
            "totals": {split: sum(per_split[split].values()) for split in SPLITS},
            "counts": per_split,
            # Named by a folder or the CSV, but none of their files became an example.
            "empty_classes": [name for name in class_names if not any(per_split[s][name] for s in SPLITS)],
            "error_groups": error_groups,
        }
        if self._unannotated is not None:  # --labels was a Label Studio export
            stats["unannotated_tasks"] = self._unannotated
        storage.write_atomic(
            storage.join(config.output, LABELS_FILE), json.dumps(class_names, indent=1).encode()
        )
        storage.write_atomic(storage.join(config.output, STATS_FILE), json.dumps(stats, indent=2).encode())
        yield stats


def run(argv: list[str] | None = None) -> PipelineResult | None:
    """Runs prepare and prints what it wrote; with --dry_run, only builds the job graph (see classify)."""
    args, pipeline_options = options.parse_pipeline_args(
        "beamvision prepare", __doc__.splitlines()[0], options.add_prepare_arguments, argv
    )
    config = options.PrepareConfig.from_args(args)
    reviewed = unannotated = None
    if config.labels and is_label_studio_export(config.labels):
        try:
            text = storage.read_text(config.labels)
        except UnicodeDecodeError:
            raise options.UsageError(f"--labels {config.labels}: not UTF-8 text") from None
        reviewed, unannotated = label_studio_labels(text, config.input)
        print(
            f"{config.labels}: {len(reviewed):,} annotated tasks, "
            f"{unannotated:,} without a choice annotation (skipped)"
        )
    pipeline = beam.Pipeline(options=pipeline_options)
    build_pipeline(pipeline, config, reviewed, unannotated)  # before any deletion: building can still fail
    if options.is_dry_run(pipeline_options):
        return options.build_only(pipeline)
    options.check_detach(config.detach, pipeline)
    # Stale shards of an earlier run (another shard count) would be read by train.
    options.claim_output(config.output, OUTPUTS, config.overwrite, "a prepared dataset")
    result = run_with_progress(pipeline, "prepare", config.progress_every, config.detach)
    if config.detach:
        print(f"prepare: detached; the job writes {storage.join(config.output, STATS_FILE)} when it ends")
        return result
    stats_uri = storage.join(config.output, STATS_FILE)
    if storage.exists(stats_uri):
        stats = json.loads(storage.read_text(stats_uri))
        if stats["inputs"] == 0:  # leave no empty dataset behind, so the corrected rerun is not refused
            options.claim_output(config.output, OUTPUTS, True, "a prepared dataset")
            source = f"--labels {config.labels}" if config.labels else f"--input {config.input}"
            raise options.UsageError(f"{source}: names no file; nothing was prepared")
        totals = ", ".join(f"{split} {n:,}" for split, n in stats["totals"].items())
        print(
            f"prepared {stats['examples']:,} of {stats['inputs']:,} images "
            f"({totals}; {stats['errors']:,} errors), "
            f"{len(stats['counts']['train'])} classes at {config.image_size}px, to {config.output}"
        )
        for line in format_error_groups(stats["error_groups"], config.output):
            print(line)
        if stats["empty_classes"]:
            print(
                f"WARNING: {len(stats['empty_classes'])} classes have no usable image: "
                f"{', '.join(stats['empty_classes'][:10])} (see {ERRORS_PREFIX}-*.parquet)",
                file=sys.stderr,
            )
        print(
            f"next: beamvision train --data {config.output} --architecture mobilenet_v2 --output MODEL_DIR "
            "(every architecture: beamvision models)"
        )
    return result
