"""``beamvision classify``: image collections in storage to Parquet results.

    beamvision classify --input 'gs://bucket/photos/**' --model gs://bucket/models/mnv2 \\
        --output gs://bucket/runs/2026-11-28 [--runner DataflowRunner ...]

MatchInputs -> SplitArchives -> LookUpFiles -> [SkipClassified] (archives:
GroupArchives) -> ReadFiles -> DecodeImages -> ClassifyImages -> WriteResults
(see docs/architecture.md). An archive (.tar, .tar.gz, .zip) stands for its
image members, ``ARCHIVE!/member.jpg``. With
``--incremental``, OUTPUT holds one ``run=ID`` partition per run and files
that an earlier completed run classified, unchanged since, are skipped (see
``beamvision.transforms.incremental``). The model artifact is validated before any work starts;
every input ends as a result row or an error row, and summary.json (printed at
the end) counts both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import apache_beam as beam
from apache_beam.runners.runner import PipelineResult

from beamvision import storage
from beamvision.models.artifact import Manifest, verify_artifact
from beamvision.pipelines import options
from beamvision.transforms.archives import CountedInputs, GroupArchives, SplitArchives
from beamvision.transforms.concurrency import MB
from beamvision.transforms.decode import DecodeImages
from beamvision.transforms.engines import ENGINES
from beamvision.transforms.incremental import SkipClassified, completed_runs, default_run_id
from beamvision.transforms.inference import BeamvisionModelHandler, ClassifyImages, start_up_timing
from beamvision.transforms.outputs import RUN_FILES, SUMMARY_FILE, run_dir
from beamvision.transforms.progress import ReportProgress, run_with_progress
from beamvision.transforms.read import LookUpFiles, MatchInputs, ReadFiles
from beamvision.transforms.write import WriteResults, format_summary


def build_pipeline(
    pipeline: beam.Pipeline,
    config: options.ClassifyConfig,
    manifest: Manifest,
    earlier_runs: list[str] | None = None,
    started_at: float | None = None,
) -> None:
    """Adds the classify steps for ``config`` to ``pipeline``, writing to ``config.output``.

    ``earlier_runs`` (``--incremental``; None otherwise): completed runs whose
    final rows make a file skipped.
    """
    sizing = config.workers.for_pipeline(pipeline)
    matched = pipeline | "MatchInputs" >> MatchInputs(
        list(config.inputs), config.input_list, config.input_list_column
    )
    # A stage boundary on names only: every input is counted (the progress total) before reading
    # starts, and reads spread over the workers (as Beam's own file reads do after a match).
    spread = matched["files"] | "SpreadReads" >> beam.Reshuffle()
    split = spread | "SplitArchives" >> SplitArchives()
    archives = split["archives"] | "GroupArchives" >> GroupArchives()
    found = split["files"] | "LookUpFiles" >> LookUpFiles(sizing)
    to_read, skipped = found["files"], None
    if earlier_runs is not None:
        skip = to_read | "SkipClassified" >> SkipClassified(list(earlier_runs))
        to_read, skipped = skip["files"], skip["skipped"]
    # Names of files and archives meet before the read: bytes never cross a stage boundary.
    requests = (to_read, archives) | "FilesAndArchives" >> beam.Flatten()
    read = requests | "ReadFiles" >> ReadFiles(config.buffer_mb * MB, sizing=sizing)
    decoded = read["files"] | "DecodeImages" >> DecodeImages(
        manifest.input_size, config.max_pixels, config.buffer_mb, sizing
    )
    handler = BeamvisionModelHandler(
        config.model,
        config.batch_size,
        config.top_k,
        config.embeddings,
        config.engine,
        config.precision,
        sizing,
    )
    classified = decoded["images"] | "ClassifyImages" >> ClassifyImages(
        handler, manifest.name, manifest.version
    )
    error_parts = {
        "found": found["errors"],
        "read": read["errors"],
        "decoded": decoded["errors"],
        "classified": classified["errors"],
    }
    errors = list(error_parts.values()) | "AllErrors" >> beam.Flatten()
    inputs = {"named": matched["inputs"], "unpacked": read["members"]} | "CountedInputs" >> CountedInputs()
    _ = classified["results"] | "ProgressResults" >> ReportProgress("results")
    _ = error_parts | "ProgressErrors" >> ReportProgress("errors")
    if skipped is not None:
        _ = skipped | "ProgressSkipped" >> ReportProgress("skipped")
    model = {
        "name": manifest.name,
        "version": manifest.version,
        "architecture": manifest.architecture,
        "uri": config.model,
        "engine": config.engine,
        "precision": config.precision,  # as asked; auto is resolved on each worker (and logged there)
        "workers": sizing.describe(),  # "auto" counts are resolved on each worker (and logged there)
    }
    written = {
        "results": classified["results"],
        "errors": errors,
        "inputs": inputs,
        "patterns": matched["patterns"],
        "not_images": read["not_images"],
    }
    if skipped is not None:
        written["skipped"] = skipped
    _ = written | "WriteResults" >> WriteResults(
        config.output, config.embeddings, model, started_at=started_at or time.time()
    )


def run(argv: list[str] | None = None) -> PipelineResult | None:
    """Validates flags and the model artifact, runs the pipeline, prints the summary.

    ``argv`` defaults to the process's own arguments (the Flex Template
    launcher runs ``deploy/classify_main.py --input=... --model=...``). With
    ``--dry_run`` nothing runs and nothing under ``--output`` is read or
    written: DataflowRunner builds its job without submitting it (the result
    is returned); other runners only build the job graph (None is returned).
    """
    args, pipeline_options = options.parse_pipeline_args(
        "beamvision classify", __doc__.splitlines()[0], options.add_classify_arguments, argv
    )
    config = options.ClassifyConfig.from_args(args)
    started_at = time.time()
    # Fails here, before any work, on a bad artifact; the model itself is built only by the workers.
    manifest = verify_artifact(config.model)
    refused = ENGINES[config.engine].refusal(config.model, manifest)
    if refused:
        raise options.UsageError(refused)
    if config.top_k is None:
        config = dataclasses.replace(config, top_k=min(options.DEFAULT_TOP_K, manifest.num_classes))
    elif config.top_k > manifest.num_classes:
        raise options.UsageError(f"--top_k {config.top_k}: the model has only {manifest.num_classes} classes")
    logging.getLogger("beamvision").info("classifying with %s version %s", manifest.name, manifest.version)
    earlier = None
    if config.incremental:  # OUTPUT is the root of all runs; this one writes OUTPUT/run=ID
        root = config.output
        config = dataclasses.replace(config, output=run_dir(root, config.run_id or default_run_id()))
        # A dry run reads nothing under --output: its graph joins with no earlier run.
        dry = options.is_dry_run(pipeline_options)
        earlier = [] if dry else completed_runs(root, manifest.name, manifest.version)
        earlier = [run for run in earlier if run.rstrip("/") != config.output.rstrip("/")]  # (--overwrite)
    pipeline = beam.Pipeline(options=pipeline_options)
    # Built before any deletion: building can still fail.
    build_pipeline(pipeline, config, manifest, earlier, started_at)
    if options.is_dry_run(pipeline_options):
        return options.build_only(pipeline)
    options.check_detach(config.detach, pipeline)
    options.claim_output(config.output, RUN_FILES, config.overwrite, "results")
    result = run_with_progress(pipeline, "classify", config.progress_every, config.detach)
    if config.detach:
        print(f"classify: detached; the job writes {storage.join(config.output, SUMMARY_FILE)} when it ends")
        return result
    summary_uri = storage.join(config.output, SUMMARY_FILE)
    if storage.exists(summary_uri):
        summary = json.loads(storage.read_text(summary_uri))
        if summary["inputs"] == 0:  # leave no empty run behind, so the corrected rerun is not refused
            options.claim_output(config.output, RUN_FILES, True, "results")
            raise options.UsageError(f"{_inputs_flags(config)}: matched no file; nothing was classified")
        timing = start_up_timing(result, started_at)
        if timing:  # added once the job's metrics are known; the file stays the run's commit point
            summary["timing"] = timing
            storage.write_atomic(summary_uri, json.dumps(summary, indent=2).encode("utf-8"))
        print(format_summary(summary))
    return result


def _inputs_flags(config: options.ClassifyConfig) -> str:
    """The input flags as the user gave them, for a message."""
    given = [f"--input {pattern}" for pattern in config.inputs]
    return " ".join(given + ([f"--input_list {config.input_list}"] if config.input_list else []))
