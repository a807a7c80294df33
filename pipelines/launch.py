"""The run lifecycle of a command's Beam job: one copy, used by every command.

``run_job`` is the skeleton that classify and prepare share: a dry run only
builds the job graph (``build_only``); otherwise ``--detach`` is checked
against the runner (``check_detach``), the files an earlier run left under
``--output`` are refused (a complete run's) or cleared (an unfinished one's,
and the litter of Beam's sinks: ``claim_output``; classify keeps an
unfinished run's rows instead, ``beamvision.transforms.resume``), the job
runs while its progress is shown (``run_with_progress``) and the report it
writes last (summary.json, stats.json) is read back; a job that found no
input leaves nothing behind, one interrupted leaves no unfinished file, and
one with too many errors exits 3 (``check_errors``). review and tune, which
show no progress line, run theirs with ``run_to_end``, as
``run_with_progress`` runs a local job. What the job counts comes from
``beamvision.transforms.progress``: on the direct runners from the tally
files its workers write into a folder this process names (``LocalProgress``;
also a portable runner's workers on this machine, whose job service reports
metrics only at the end), on Dataflow from the job's metrics (``watch_job``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import threading
from collections.abc import Callable
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, TestOptions
from apache_beam.runners.runner import PipelineResult

from beamvision import exits, storage
from beamvision.console import Counts, ProgressLine, counted
from beamvision.pipelines.flags import UsageError
from beamvision.transforms import progress
from beamvision.transforms.outputs import BEAM_TEMP_DIRS
from beamvision.transforms.rows import METRICS_NAMESPACE
from beamvision.transforms.runners import RunnerKind, is_remote, runner_kind, runner_name

REMOTE_POLL_SECONDS = 5.0


@dataclasses.dataclass(frozen=True)
class Job:
    """What a command's job writes and how it is followed.

    Attributes:
        title: the command (``classify``), which begins its progress and messages.
        output: the ``--output`` it writes under.
        owned: the file names or globs under ``output`` that a run writes (a rerun replaces them).
        holds: what those files are, for the refusal (``results``, ``a prepared dataset``).
        report: the file under ``output`` the job writes last, its commit point.
        overwrite: ``--overwrite``.
        progress_every: ``--progress_every``.
        detach: ``--detach``.
        claim: the command's own claim of ``output``, instead of ``claim_output``'s (classify's, which
            keeps an interrupted run's rows); it also says what an interrupt keeps (``exits.on_interrupt``).
        submitted: called with a remote job's result once it is submitted (before it is followed).
    """

    title: str
    output: str
    owned: list[str]
    holds: str
    report: str
    overwrite: bool
    progress_every: float
    detach: bool
    claim: Callable[[], None] | None = None
    submitted: Callable[[PipelineResult], None] | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a job ended: its result (None for a dry run on a local runner) and its report, when read."""

    result: PipelineResult | None
    report: dict[str, Any] | None = None


def run_job(pipeline: beam.Pipeline, options: PipelineOptions, job: Job, nothing_found: str) -> Outcome:
    """Runs a built job from start to end: dry run, --detach, --output, progress, its report.

    Args:
        pipeline: the job, built (building can still fail: nothing is deleted before).
        options: its pipeline options (``--dry_run``).
        job: what it writes and how it is followed.
        nothing_found: the message of the UsageError raised when the job found no input
            (its report counts no ``inputs``); its files are removed first.

    Returns:
        The result, and the report unless the run was dry, detached or wrote none.
    """
    if is_dry_run(options):
        return Outcome(build_only(pipeline))
    check_detach(job.detach, pipeline)
    report_uri = storage.join(job.output, job.report)
    if job.claim is None:
        claim_output(job.output, job.owned, job.overwrite, job.holds, job.report)
        exits.on_interrupt(lambda: discard_unfinished(job.output, job.owned, job.report))
    else:
        job.claim()
    result = run_with_progress(pipeline, job.title, job.progress_every, job.detach, job.submitted)
    if job.detach:
        print(f"{job.title}: detached; the job writes {report_uri} when it ends")
        return Outcome(result)
    if not storage.exists(report_uri):
        return Outcome(result)
    report = json.loads(storage.read_text(report_uri))
    if report["inputs"] == 0:  # leave nothing behind, so the corrected rerun is not refused
        claim_output(job.output, job.owned, True, job.holds, job.report)
        raise UsageError(nothing_found)
    return Outcome(result, report)


def is_dry_run(options: PipelineOptions) -> bool:
    """Whether Beam's ``--dry_run`` was given (``flags.parse_pipeline_args`` reads it as a switch)."""
    return bool(options.view_as(TestOptions).dry_run)


def build_only(pipeline: beam.Pipeline) -> PipelineResult | None:
    """What ``--dry_run`` does: build the job graph, run nothing, touch no output.

    DataflowRunner builds its job without submitting it (its result is
    returned); Beam's direct runners would ignore --dry_run and run, so for
    them the graph is only built (None is returned).
    """
    if runner_kind(pipeline) is RunnerKind.DATAFLOW:
        result = pipeline.run()
        steps = len(result.job.proto_pipeline.components.transforms)
    else:
        result = None
        steps = len(pipeline.to_runner_api().components.transforms)
    submitted = ", no job submitted, so no progress to follow" if is_remote(pipeline) else ""
    print(
        f"dry run: built the {runner_name(pipeline)} job graph ({steps} steps); "
        f"nothing was run or written{submitted}"
    )
    return result


def check_detach(detach: bool, pipeline: beam.Pipeline) -> None:
    """``--detach`` needs a runner whose job outlives this process."""
    if detach and not is_remote(pipeline):
        raise UsageError(
            f"--detach: a {runner_name(pipeline)} job runs on this machine and ends with this process; "
            "only a Dataflow job can be left running (--runner DataflowRunner)"
        )


def claim_output(
    output: str, names: list[str], overwrite: bool, holds: str, report: str | None = None
) -> None:
    """Refuses an ``--output`` that already holds a run's files, unless ``--overwrite``; then clears them.

    ``names`` are file names or globs under ``output`` (``results-*``); a rerun
    must never mix its files with stale ones of an earlier run. With
    ``report`` (the file a run writes last), files without it are an
    unfinished run's (killed, interrupted): they are cleared without asking.
    The litter Beam's sinks leave when a job dies (``beam-temp-*``) is always cleared.
    """
    storage.check_reachable(output)
    existing = _owned_files(output, names)
    complete = report is None or storage.exists(storage.join(output, report))
    if existing and complete and not overwrite:
        raise UsageError(
            f"--output {output}: already holds {holds} ({counted(len(existing), 'file')}); "
            "choose a new place or pass --overwrite"
        )
    if existing:
        FileSystems.delete(existing)
    storage.delete_matching(beam_litter(output))


def discard_unfinished(output: str, names: list[str], report: str) -> str:
    """What an interrupt of a run that keeps nothing does: its unfinished files go; says how to go on."""
    if storage.exists(storage.join(output, report)):
        return "its output was complete before the interrupt, and is kept"
    unfinished = _owned_files(output, names)
    if unfinished:
        FileSystems.delete(unfinished)
    storage.delete_matching(beam_litter(output))
    return f"nothing was kept (its unfinished files in {output} are removed); run the same command again"


def beam_litter(output: str) -> list[str]:
    """Globs of what Beam's file sinks leave under ``output`` when a job dies before finalising."""
    folder = storage.join(glob.escape(output), BEAM_TEMP_DIRS)
    return [folder, storage.join(folder, "*")]


def _owned_files(output: str, names: list[str]) -> list[str]:
    matches = FileSystems.match([storage.join(glob.escape(output), name) for name in names])
    return sorted({m.path for match in matches for m in match.metadata_list})


def check_errors(report: dict[str, Any], max_rate: float, rows_in: str) -> None:
    """Raises ``exits.RunFailed`` (status 3) when every input failed or more than ``max_rate`` of them did.

    The share is of the inputs this run made a row for (``results`` + ``errors``;
    ``prepare`` calls its results ``examples``); files skipped as already
    classified do not count. The rows are written before: a scheduler sees the
    status, a person reads them in ``rows_in``.
    """
    done = report.get("results", report.get("examples", 0))
    failed = report["errors"]
    if not failed:
        return
    share = failed / (done + failed)
    if done == 0 or share > max_rate:
        what = "every input failed" if done == 0 else f"{share:.1%} of the inputs failed"
        raise exits.RunFailed(
            f"{what} ({failed:,} of {done + failed:,}; --max_error_rate {max_rate:g}); "
            f"the error rows are in {rows_in}"
        )


# --- following a run ------------------------------------------------------------------------------


def run_to_end(pipeline: beam.Pipeline) -> PipelineResult:
    """Runs ``pipeline`` and waits for its end (a Dataflow job is followed by ``watch_job`` instead).

    ``run_with_progress`` runs a local job this way while it shows progress;
    the commands that show none (review's thumbnails, tune's trials, which
    print their own lines) call it directly.
    """
    result = pipeline.run()
    result.wait_until_finish()
    return result


def run_with_progress(
    pipeline: beam.Pipeline,
    title: str,
    every: float,
    detach: bool = False,
    submitted: Callable[[PipelineResult], None] | None = None,
) -> PipelineResult:
    """Runs ``pipeline`` to the end while its progress is shown (``console.ProgressLine``).

    A remote job is announced with its console URL (and handed to ``submitted``);
    with ``detach`` it is left running and its result returned at once (the
    caller prints no summary).
    """
    if is_remote(pipeline):
        result = pipeline.run()
        url = console_url(result, pipeline.options)
        job = f"job {result.job_id()}" if hasattr(result, "job_id") else "job"
        print(f"{title}: submitted {job}" + (f": {url}" if url else ""), flush=True)
        exits.on_interrupt(lambda: remote_job_kept(result, pipeline.options))
        if submitted is not None:
            submitted(result)
        if not detach:
            watch_job(result, ProgressLine(title, every=every))
        return result
    return _run_locally(pipeline, ProgressLine(title, every=every))


def _run_locally(pipeline: beam.Pipeline, line: ProgressLine) -> PipelineResult:
    """Runs a job while a thread shows the sums of its workers' tallies on ``line``.

    A portable runner's workers on other machines (a Flink or Spark cluster)
    write no tally here: the last line then has the job's metrics, which
    Beam's job services report once the job is over.
    """
    result = None
    with LocalProgress(pipeline) as local:
        stop = threading.Event()

        def show() -> None:
            while not stop.wait(line.poll_seconds):
                line.update(local.counts())

        thread = threading.Thread(target=show, name="beamvision-progress", daemon=True)
        thread.start()
        try:
            result = run_to_end(pipeline)
        finally:
            stop.set()
            thread.join()
            counts = local.counts()
            if result is not None and counts.inputs == 0 and runner_kind(pipeline) is RunnerKind.PORTABLE:
                with contextlib.suppress(Exception):  # a job service that reports no metrics
                    counts = job_counts(result, final=True)
            line.close(counts)
    return result


class LocalProgress:
    """The launcher's side of a run on this machine: the folder its workers report to, and their sum."""

    def __init__(self, pipeline: beam.Pipeline):
        self.folder = progress.tally_folder(pipeline)

    def __enter__(self) -> LocalProgress:
        os.makedirs(self.folder, exist_ok=True)
        return self

    def counts(self) -> Counts:
        return Counts(**progress.read_tallies(self.folder))

    def __exit__(self, *exc) -> None:
        progress.forget_tally(self.folder)  # this process's own tally of the run, if it worked for it
        shutil.rmtree(self.folder, ignore_errors=True)


def job_counts(result: PipelineResult, final: bool = False) -> Counts:
    """The progress counters of a job, from the runner's metrics.

    While it runs, attempted values (committed ones lag); once it is over,
    committed ones, which do not count retried bundles twice.
    """
    from apache_beam.metrics.metric import MetricsFilter

    queried = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    sums = dict.fromkeys(progress.KINDS, 0)
    names = {progress.counter_name(kind): kind for kind in progress.KINDS}
    for record in queried["counters"]:
        kind = names.get(record.key.metric.name)
        if kind is not None:
            preferred, other = record.attempted, record.committed
            if final:
                preferred, other = other, preferred
            sums[kind] += preferred if preferred is not None else other or 0
    return Counts(**sums)


def remote_job_kept(result: PipelineResult, options: PipelineOptions) -> str:
    """What an interrupt of this process leaves of a remote job: the job, running; it commits its output."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    job_id = result.job_id() if hasattr(result, "job_id") else "JOB_ID"
    region = options.view_as(GoogleCloudOptions).region or "REGION"
    return (
        f"the job keeps running and writes its output itself; to stop it: "
        f"gcloud dataflow jobs cancel {job_id} --region {region}"
    )


def console_url(result: PipelineResult, options: PipelineOptions) -> str | None:
    """The job's page in the Google Cloud console, for a Dataflow job."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    job_id = getattr(result, "job_id", None)
    if job_id is None:
        return None
    gcp = options.view_as(GoogleCloudOptions)
    return f"https://console.cloud.google.com/dataflow/jobs/{gcp.region}/{job_id()}?project={gcp.project}"


def watch_job(result: PipelineResult, line: ProgressLine, interval: float | None = None) -> None:
    """Waits for a remote job as Beam does, showing its counters on ``line`` meanwhile.

    Beam's ``wait_until_finish`` runs in a thread, so its own handling stays:
    the job's messages are logged and a job that did not end DONE (failed,
    cancelled) raises here. The metrics, an API call, are read every
    ``interval`` seconds: at least ``REMOTE_POLL_SECONDS``, and in a log at
    each line's time.
    """
    outcome: dict = {}

    def wait() -> None:
        try:
            result.wait_until_finish()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    waiter = threading.Thread(target=wait, name="beamvision-wait", daemon=True)
    waiter.start()
    if interval is None:
        interval = max(REMOTE_POLL_SECONDS, 0.0 if line.redraws else line.every)
    counts = Counts()
    while waiter.is_alive():
        with contextlib.suppress(Exception):  # no metrics yet (the job is starting): the next poll
            counts = job_counts(result)
            line.update(counts)
        waiter.join(interval)
    with contextlib.suppress(Exception):
        counts = job_counts(result, final=True)
    line.close(counts)
    if "error" in outcome:
        raise outcome["error"]
