"""``beamvision prepare``: labelled images to split TFRecord shards for training.

    beamvision prepare --input gs://bucket/flowers --output gs://bucket/data/flowers --image_size 224

Input is a folder per class (``ROOT/<class>/...``) or a CSV of ``uri,label``.
Images are decoded by ``decode_image`` (the function classify uses), assigned
to train/val/test by a hash of their path under ROOT (stable across reruns and
runners), and written as TFRecord shards with labels.json and stats.json (see
``beamvision.transforms.dataset``). Bad images become error rows; they never stop the job.
"""

from __future__ import annotations

import csv
import json

import apache_beam as beam
from apache_beam.runners.runner import PipelineResult

from beamvision import storage
from beamvision.pipelines import options
from beamvision.transforms.dataset import (
    LABELS_FILE,
    SPLITS,
    STATS_FILE,
    assign_split,
    folder_label,
    relative_key,
    serialize_example,
    shard_prefix,
)
from beamvision.transforms.decode import DecodeImages
from beamvision.transforms.read import ReadImages, listed_uri
from beamvision.transforms.rows import ERRORS_TAG, error_row
from beamvision.transforms.write import ERRORS_PREFIX, WriteErrors

# Every file a prepare run writes under --output.
OUTPUTS = [f"{split}-*.tfrecord" for split in SPLITS] + [f"{ERRORS_PREFIX}-*", LABELS_FILE, STATS_FILE]


def build_pipeline(pipeline: beam.Pipeline, config: options.PrepareConfig) -> None:
    """Adds the prepare steps for ``config`` to ``pipeline``."""
    if config.labels:
        read = pipeline | "ReadImages" >> ReadImages(
            [], config.labels, list_is_csv=True, list_root=config.input
        )
        csv_labels = (
            pipeline
            | "ReadLabelCsv" >> beam.io.ReadFromText(config.labels)
            | "ParseLabels" >> beam.FlatMap(_csv_label, config.input)
        )
        label_map = beam.pvalue.AsDict(csv_labels)
    else:
        read = pipeline | "ReadImages" >> ReadImages([config.input])
        label_map = None
    decoded = read["files"] | "DecodeImages" >> DecodeImages(config.image_size, config.max_pixels)
    labelled = decoded["images"] | "Label" >> beam.ParDo(_LabelFn(config), label_map or {}).with_outputs(
        ERRORS_TAG, main="examples"
    )
    examples = labelled.examples
    class_names = beam.pvalue.AsSingleton(
        examples
        | "ClassNames" >> beam.Map(lambda e: e[1])
        | "DistinctClasses" >> beam.Distinct()
        | "SortedClasses" >> beam.combiners.ToList()
        | "Sort" >> beam.Map(sorted)
    )
    written = []
    for split in SPLITS:
        written.append(
            examples
            | f"Only{split.title()}" >> beam.Filter(lambda e, s=split: e[0] == s)
            | f"Serialize{split.title()}" >> beam.Map(_serialize, class_names)
            | f"Write{split.title()}"
            >> beam.io.WriteToTFRecord(shard_prefix(config.output, split), file_name_suffix=".tfrecord")
        )
    errors = (read["errors"], decoded["errors"], labelled[ERRORS_TAG]) | "AllErrors" >> beam.Flatten()
    written.append(errors | "WriteErrorShards" >> WriteErrors(config.output))
    count = beam.combiners.Count
    _ = (
        pipeline
        | "StatsTrigger" >> beam.Create([None])
        | "WriteLabelsAndStats"
        >> beam.ParDo(
            _WriteStatsFn(config),
            class_names=class_names,
            counts=beam.pvalue.AsList(
                examples
                | "SplitAndClass" >> beam.Map(lambda e: (e[0], e[1]))
                | "CountPerClass" >> count.PerElement()
            ),
            inputs=beam.pvalue.AsSingleton(read["inputs"] | "CountInputs" >> count.Globally()),
            errors=beam.pvalue.AsSingleton(errors | "CountErrors" >> count.Globally()),
            files=beam.pvalue.AsList(written | "AllWritten" >> beam.Flatten()),
        )
    )


def _csv_label(line: str, root: str):
    uris = listed_uri(line, is_csv=True, root=root)
    fields = next(csv.reader([line]), [])
    if uris and len(fields) >= 2 and fields[1].strip():
        yield uris[0], fields[1].strip()


class _LabelFn(beam.DoFn):
    """(ImageKey, pixels) to (split, class name, uri, pixels); unlabelled files to error rows."""

    def __init__(self, config: options.PrepareConfig):
        self._config = config

    def process(self, element, label_map):
        key, pixels = element
        config = self._config
        label = label_map.get(key.uri) if config.labels else folder_label(key.uri, config.input)
        if not label:
            where = "has no label in the CSV" if config.labels else "is not inside a class folder"
            yield beam.pvalue.TaggedOutput(
                ERRORS_TAG, error_row(key.uri, "label", "NoLabel", f"file {where}")
            )
            return
        split = assign_split(
            relative_key(key.uri, config.input), config.val_fraction, config.test_fraction, config.seed
        )
        yield split, label, key.uri, pixels


def _serialize(example, class_names):
    _split, label, uri, pixels = example
    return serialize_example(pixels, class_names.index(label), uri)


class _WriteStatsFn(beam.DoFn):
    def __init__(self, config: options.PrepareConfig):
        self._config = config

    def process(self, _, class_names, counts, inputs, errors, files):
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
        }
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
    pipeline = beam.Pipeline(options=pipeline_options)
    build_pipeline(pipeline, config)  # before any deletion: building can still fail
    if options.is_dry_run(pipeline_options):
        return options.build_only(pipeline)
    # Stale shards of an earlier run (another shard count) would be read by train.
    options.claim_output(config.output, OUTPUTS, config.overwrite, "a prepared dataset")
    result = pipeline.run()
    result.wait_until_finish()
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
    return result
