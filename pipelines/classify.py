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
the end) counts both. Rows go to parts first and are committed only at the
end: an interrupted run's rows are kept by the rerun of the same command
(``beamvision.transforms.resume``).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import time
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult

from beamvision import exits, storage
from beamvision.console import DEFAULT_PROGRESS_SECONDS, counted
from beamvision.models.artifact import Manifest, verify_artifact
from beamvision.pipelines.flags import (
    DEFAULT_MAX_ERROR_RATE,
    UsageError,
    add_decode_arguments,
    add_engine_arguments,
    add_error_rate_argument,
    add_progress_arguments,
    add_switch,
    add_worker_arguments,
    check_engine_arguments,
    check_file_exists,
    parse_pipeline_args,
    positive_float,
    positive_int,
    worker_sizing,
)
from beamvision.pipelines.launch import Job, Outcome, beam_litter, check_errors, is_dry_run, run_job
from beamvision.pipelines.reports import format_summary
from beamvision.transforms import catalog_lock
from beamvision.transforms.archives import CountedInputs, GroupArchives, SplitArchives
from beamvision.transforms.concurrency import MB
from beamvision.transforms.decode import DecodeImages
from beamvision.transforms.engines import DEFAULT_ENGINE, GPU_ENGINES
from beamvision.transforms.incremental import EarlierRun, SkipClassified, completed_runs, default_run_id
from beamvision.transforms.inference import BeamvisionModelHandler, ClassifyImages, start_up_timing
from beamvision.transforms.outputs import (
    RUN_FILES,
    RUN_ID_PATTERN,
    SUMMARY_FILE,
    errors_pattern,
    partial_dir,
    run_dir,
)
from beamvision.transforms.progress import ReportProgress
from beamvision.transforms.read import (
    LookUpFiles,
    MatchInputs,
    ReadFiles,
    csv_column_index,
    list_format,
    parquet_has_column,
)
from beamvision.transforms.resume import (
    DEFAULT_CHECKPOINT_SECONDS,
    KeepFinished,
    Resume,
    kept_rows,
    partial_runs,
    plan_resume,
    running_owner,
    write_attempt,
)
from beamvision.transforms.runners import new_pipeline
from beamvision.transforms.sizing import (
    ACCELERATOR_OPTION,
    CPU_BATCH_SIZE,
    DEFAULT_SIZING,
    GPU_BATCH_SIZE,
    ONE_SDK_PROCESS_EXPERIMENT,
    GpuWorkers,
    WorkerSizing,
)
from beamvision.transforms.write import WriteResults

DEFAULT_TOP_K = 5


def run_id(text: str) -> str:
    """argparse type of --run_id: letters, digits and . _ : - (it becomes a path segment)."""
    if not RUN_ID_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '.', '_', ':' or '-', received {text!r}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """classify's flags (deploy/metadata.json mirrors them: the Flex Template's parameters)."""
    _add_input_arguments(parser)
    parser.add_argument(
        "--model", required=True, metavar="MODEL", help="model artifact directory, local or URI"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory, local or URI")
    _add_inference_arguments(parser)
    add_decode_arguments(parser)
    add_worker_arguments(parser, inference=True)
    add_switch(
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
    add_switch(parser, "--overwrite", "replace results, errors and summary already in --output")
    parser.add_argument(
        "--checkpoint_every",
        type=positive_float,
        default=DEFAULT_CHECKPOINT_SECONDS,
        metavar="SECONDS",
        help="seconds between a worker's flushes of its rows to the run's partial folder: an interrupted "
        "run loses at most this much work per worker, its rerun keeps the rest "
        f"(default {DEFAULT_CHECKPOINT_SECONDS:g})",
    )
    add_error_rate_argument(parser)
    add_progress_arguments(parser)


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
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


def _add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--top_k",
        type=positive_int,
        metavar="K",
        help=f"classes per image (default {DEFAULT_TOP_K}, or every class of a smaller model)",
    )
    parser.add_argument(
        "--batch_size",
        type=positive_int,
        metavar="N",
        help=f"images per inference batch (default {CPU_BATCH_SIZE}; {GPU_BATCH_SIZE} on GPU workers)",
    )
    add_switch(parser, "--embeddings", "also write each image's pooled features before the classifier")
    add_engine_arguments(parser)


@dataclasses.dataclass(frozen=True)
class Config:
    inputs: tuple[str, ...]
    input_list: str | None
    input_list_column: str
    model: str
    output: str
    top_k: int | None  # None: DEFAULT_TOP_K, or every class of a smaller model
    threshold: float | None  # --threshold of a multi-label model (None: each class's own)
    batch_size: int | None  # None: the workers' default (GpuWorkers.batch_size)
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
    checkpoint_every: float = DEFAULT_CHECKPOINT_SECONDS
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    partial: str = ""  # where the run's parts wait for its commit (set once the run's output is known)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        if not args.input and not args.input_list:
            raise UsageError("give at least one --input PATTERN or an --input_list FILE")
        if args.run_id and not args.incremental:
            raise UsageError(f"--run_id {args.run_id}: only with --incremental (it names OUTPUT/run=ID)")
        check_file_exists("--input_list", args.input_list)
        column = _check_list_column(args.input_list, args.input_list_column)
        return cls(
            tuple(args.input),
            args.input_list,
            column,
            args.model,
            args.output,
            args.top_k,
            args.threshold,
            args.batch_size,
            args.embeddings,
            args.max_pixels,
            args.buffer_mb,
            args.incremental,
            args.run_id,
            args.overwrite,
            args.engine,
            args.precision,
            worker_sizing(args),
            args.progress_every,
            args.detach,
            args.checkpoint_every,
            args.max_error_rate,
        )


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


def build_pipeline(
    pipeline: beam.Pipeline,
    config: Config,
    manifest: Manifest,
    earlier_runs: list[EarlierRun] | None = None,
    started_at: float | None = None,
    resume: Resume | None = None,
) -> None:
    """Adds the classify steps for ``config`` to ``pipeline``, writing to ``config.output``.

    ``earlier_runs`` (``--incremental``; None otherwise): completed runs whose
    final rows make a file skipped. ``resume``: an interrupted run's rows to keep.
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
    to_read, skipped, kept = found["files"], None, None
    if resume:
        kept = to_read | "KeepFinished" >> KeepFinished(resume)
        to_read = kept["files"]
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
        GpuWorkers.of(pipeline.options).batch_size(config.batch_size),
        config.top_k,
        config.embeddings,
        config.engine,
        config.precision,
        sizing,
        config.threshold,
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
    inputs = {"named": matched["inputs"], "unpacked": read["members"]} | "CountedInputs" >> CountedInputs()
    _ = classified["results"] | "ProgressResults" >> ReportProgress("results")
    _ = error_parts | "ProgressErrors" >> ReportProgress("errors")
    if skipped is not None:
        _ = skipped | "ProgressSkipped" >> ReportProgress("skipped")
    written = {
        "results": classified["results"],
        "errors": error_parts,
        "inputs": inputs,
        "patterns": matched["patterns"],
        "not_images": read["not_images"],
    }
    if skipped is not None:
        written["skipped"] = skipped
    if kept is not None:
        _ = kept["results"] | "ProgressKeptResults" >> ReportProgress("results")
        _ = kept["errors"] | "ProgressKeptErrors" >> ReportProgress("errors")
        written["kept_results"], written["kept_errors"] = kept["results"], kept["errors"]
    _ = written | "WriteResults" >> WriteResults(
        config.output,
        config.partial or partial_dir(config.output),
        config.embeddings,
        _model_record(config, manifest, sizing),
        started_at or time.time(),
        config.checkpoint_every,
        manifest.multi_label,
    )


def _model_record(config: Config, manifest: Manifest, sizing: WorkerSizing) -> dict[str, Any]:
    """What summary.json says of the model and how the workers run it."""
    return {
        "name": manifest.name,
        "version": manifest.version,
        "architecture": manifest.architecture,
        "uri": config.model,
        "labels": list(manifest.labels),  # the classes it could choose: export-labels hands them on
        "engine": config.engine,
        "precision": config.precision,  # as asked; auto is resolved on each worker (and logged there)
        "workers": sizing.describe(),  # "auto" counts are resolved on each worker (and logged there)
        # A multi-label model's label sets depend on it (None: each class's own); --incremental matches it.
        **({"threshold": config.threshold} if manifest.multi_label else {}),
    }


def run(argv: list[str] | None = None) -> PipelineResult | None:
    """Validates flags and the model artifact, runs the pipeline, prints the summary.

    ``argv`` defaults to the process's own arguments (the Flex Template
    launcher runs ``deploy/classify_main.py --input=... --model=...``). With
    ``--dry_run`` nothing runs and nothing under ``--output`` is read or
    written: DataflowRunner builds its job without submitting it (the result
    is returned); other runners only build the job graph (None is returned).
    """
    args, pipeline_options = parse_pipeline_args(
        "beamvision classify", __doc__.splitlines()[0], add_arguments, argv
    )
    config = Config.from_args(args)
    started_at = time.time()
    config, manifest = _check_model(config)
    _check_gpu_workers(config, pipeline_options)
    if not is_dry_run(pipeline_options):  # workers match the inputs, retrying an unreachable host for minutes
        storage.check_reachable(*config.inputs)
    logging.getLogger("beamvision").info("classifying with %s version %s", manifest.name, manifest.version)
    dry_run = is_dry_run(pipeline_options)
    pipeline = new_pipeline(pipeline_options)
    lock = None  # an incremental night holds its catalog from its first read to its commit
    if config.incremental and not dry_run:
        lock = catalog_lock.take(config.output, "classify --incremental", "--output", config.run_id)
    try:
        config, outcome = _classify(config, manifest, pipeline, pipeline_options, started_at, lock)
    except KeyboardInterrupt:
        if lock is not None and lock.job is None:  # a Dataflow job goes on: the lock stays until it commits
            lock.release()
        raise
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if lock is not None and not (config.detach and lock.job):
        lock.release()
    summary = outcome.report
    if summary is not None:
        timing = start_up_timing(outcome.result, started_at)
        if timing:  # added once the job's metrics are known; the file stays the run's commit point
            summary["timing"] = timing
            storage.write_atomic(
                storage.join(config.output, SUMMARY_FILE), json.dumps(summary, indent=2).encode("utf-8")
            )
        print(format_summary(summary))
        if summary.get("resumed"):
            print(f"resumed: {summary['resumed']:,} rows kept from the interrupted run, not made again")
        check_errors(summary, config.max_error_rate, errors_pattern(config.output))
    return outcome.result


def _classify(
    config: Config,
    manifest: Manifest,
    pipeline: beam.Pipeline,
    pipeline_options: PipelineOptions,
    started_at: float,
    lock: catalog_lock.CatalogLock | None,
) -> tuple[Config, Outcome]:
    """Plans the output (a night's run, what an interrupted run left), builds and runs the job."""
    earlier, stale_runs = None, []
    dry_run = is_dry_run(pipeline_options)
    if config.incremental:  # OUTPUT is the root of all runs; this one writes OUTPUT/run=ID
        config, earlier, stale_runs = _incremental_run(config, manifest, dry_run, lock)
    else:
        config = dataclasses.replace(config, partial=partial_dir(config.output))
    attempt = _attempt_record(config, manifest)
    # Read only: what is deleted is deleted once the job is built (building can still fail).
    resume, stale = (Resume(), []) if dry_run else _plan_output(config, attempt)
    stale += [uri for folder in stale_runs for uri in storage.list_files(folder)]
    if resume:
        print(
            f"classify: resuming an interrupted run into {config.output}: up to "
            f"{counted(resume.rows, 'row')} are kept, their files (unchanged since) are not classified again"
        )
    build_pipeline(pipeline, config, manifest, earlier, started_at, resume)
    job = Job(
        "classify",
        config.output,
        RUN_FILES,
        "results",
        SUMMARY_FILE,
        config.overwrite,
        config.progress_every,
        config.detach,
        claim=lambda: _claim_output(config, attempt, stale),
        submitted=None if lock is None else lambda result: lock.name_job(result.job_id()),
    )
    outcome = run_job(
        pipeline, pipeline_options, job, f"{_inputs_flags(config)}: matched no file; nothing was classified"
    )
    return config, outcome


def _attempt_record(config: Config, manifest: Manifest) -> dict[str, Any]:
    """What this run's rows are made with: an interrupted run's rows are kept only when all of it is equal."""
    return {
        "model": {"name": manifest.name, "version": manifest.version},
        "top_k": config.top_k,
        "embeddings": config.embeddings,
        "engine": config.engine,
        "precision": config.precision,
        **({"threshold": config.threshold} if manifest.multi_label else {}),  # its rows' label sets
    }


def _plan_output(config: Config, attempt: dict[str, Any]) -> tuple[Resume, list[str]]:
    """What this run keeps of an interrupted one in its output, and the files to delete before it runs.

    A complete run there (its summary.json) is refused, or with --overwrite
    deleted; an unfinished one's rows are kept when made with ``attempt``.
    """
    running = running_owner(config.partial)
    if running is not None:
        raise UsageError(
            f"--output {config.output}: a run on this machine (pid {running}) is writing there now; "
            "wait for it to end, or stop it (its rerun keeps its finished rows)"
        )
    if storage.exists(storage.join(config.output, SUMMARY_FILE)):
        owned = [storage.join(glob.escape(config.output), name) for name in RUN_FILES]
        existing = [uri for pattern in owned for uri, _size in storage.match_sizes(pattern)]
        if not config.overwrite:
            raise UsageError(
                f"--output {config.output}: already holds results ({counted(len(existing), 'file')}); "
                "choose a new place or pass --overwrite"
            )
        return Resume(), existing + storage.list_files(config.partial)
    return plan_resume(config.output, config.partial, attempt)


def _claim_output(config: Config, attempt: dict[str, Any], stale: list[str]) -> None:
    """Just before the job runs: stale files deleted, the attempt recorded, what an interrupt keeps said."""
    if stale:
        storage.delete_matching([glob.escape(uri) for uri in stale])
    storage.delete_matching(beam_litter(config.output))  # what Beam's sinks left (classify before 0.2)
    write_attempt(config.partial, attempt)

    def kept() -> str:
        if storage.exists(storage.join(config.output, SUMMARY_FILE)):
            return f"the run was complete before the interrupt: its output in {config.output} is kept"
        rows = kept_rows(config.output, config.partial)
        if not rows:
            return "no rows were flushed yet; run the same command again"
        return (
            f"kept up to {counted(rows, 'finished row')} in {config.partial}; "
            "run the same command again to classify only the rest"
        )

    exits.on_interrupt(kept)


def _check_gpu_workers(config: Config, pipeline_options: PipelineOptions) -> None:
    """The GPUs each worker is asked for, checked against the engine; one SDK process per GPU machine."""
    try:
        gpus = GpuWorkers.of(pipeline_options)
    except ValueError as exc:
        raise UsageError(f"--dataflow_service_options {exc}") from None
    if not gpus:
        return
    if gpus.count > 1:
        raise UsageError(
            f"--dataflow_service_options {ACCELERATOR_OPTION}=...count:{gpus.count}: beamvision runs one "
            "model on one GPU per worker; ask for count:1 and more workers (--max_num_workers)"
        )
    if config.engine not in GPU_ENGINES:
        raise UsageError(
            f"--engine {config.engine}: computes on the CPU, not on the workers' {gpus.type or 'GPU'}; "
            f"GPU workers run --engine {' or '.join(GPU_ENGINES)}"
        )
    if gpus.one_process_per_machine(pipeline_options):
        logging.getLogger("beamvision").info(
            "GPU workers: one SDK process per machine (--experiments %s added)", ONE_SDK_PROCESS_EXPERIMENT
        )


def _check_model(config: Config) -> tuple[Config, Manifest]:
    """The artifact's manifest, checked against the flags; ``--top_k`` resolved for its classes."""
    # Fails here, before any work, on a bad artifact; the model itself is built only by the workers.
    manifest = verify_artifact(config.model)
    check_engine_arguments(config.model, manifest, config.engine, config.threshold)
    if config.embeddings and manifest.classifier_layer is None:
        raise UsageError(
            f"--embeddings: the model at {config.model} (an imported {manifest.origin.get('format')}) "
            "shows no features before its classifier"
        )
    if config.top_k is None:
        config = dataclasses.replace(config, top_k=min(DEFAULT_TOP_K, manifest.num_classes))
    elif config.top_k > manifest.num_classes:
        raise UsageError(f"--top_k {config.top_k}: the model has only {manifest.num_classes} classes")
    return config, manifest


def _incremental_run(
    config: Config, manifest: Manifest, dry_run: bool, lock: catalog_lock.CatalogLock | None
) -> tuple[Config, list[EarlierRun], list[str]]:
    """This run's config (writing OUTPUT/run=ID), the completed earlier runs, and the folders to delete.

    Without --run_id, a run that an interrupt left unfinished under OUTPUT is
    resumed, under its own ID; with one, the unfinished runs of other IDs are
    deleted once the job is built (their files are classified again, as by no
    run). The catalog's lock (``lock``, held unless a dry run) means no other
    night is writing: an unfinished run is one that died.
    """
    root = config.output
    unfinished, committed = ([], []) if dry_run else partial_runs(root)
    run_id = config.run_id or (unfinished[-1] if unfinished else default_run_id())
    # Litter of runs killed after their commit point, and the parts of other unfinished runs.
    stale = [partial_dir(root, litter) for litter in committed]
    for orphan in unfinished:
        if orphan != run_id:
            logging.getLogger("beamvision").warning("deleting the parts of the unfinished run %s", orphan)
            stale += [partial_dir(root, orphan), run_dir(root, orphan)]
    config = dataclasses.replace(config, output=run_dir(root, run_id), partial=partial_dir(root, run_id))
    if lock is not None:
        lock.name_run(run_id)
    # A dry run reads nothing under --output: its graph joins with no earlier run.
    earlier = [] if dry_run else completed_runs(root, manifest.name, manifest.version, config.threshold)
    earlier = [run for run in earlier if run.folder.rstrip("/") != config.output.rstrip("/")]  # --overwrite
    return config, earlier, stale


def _inputs_flags(config: Config) -> str:
    """The input flags as the user gave them, for a message."""
    given = [f"--input {pattern}" for pattern in config.inputs]
    return " ".join(given + ([f"--input_list {config.input_list}"] if config.input_list else []))
