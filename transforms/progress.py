"""Live progress of a Beam run: counted in the pipeline, shown by the process that launched it.

``ReportProgress(kind)`` counts a PCollection's elements (``KINDS``: inputs
found, results, errors, inputs skipped) two ways:

- as the Beam counter ``beamvision/progress_<kind>``: what Dataflow's job
  metrics show while the job runs (``watch_job``);
- on Beam's direct runners, which report metrics only once the run is over,
  in one small JSON file per worker process, in the folder the launching
  process names in ``BEAMVISION_PROGRESS_DIR`` (``LocalProgress``; worker
  processes inherit it). Each file is rewritten at most every half second and
  at the end of each bundle.

``run_with_progress`` runs a pipeline while a ``console.ProgressLine`` shows
the sums, and on Dataflow prints the job's console URL first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.runners.runner import PipelineResult

from beamvision.console import Counts, ProgressLine
from beamvision.transforms.rows import METRICS_NAMESPACE
from beamvision.transforms.runners import is_remote

KINDS = ("inputs", "results", "errors", "skipped")
PROGRESS_DIR_ENV = "BEAMVISION_PROGRESS_DIR"
WRITE_EVERY_SECONDS = 0.5
REMOTE_POLL_SECONDS = 5.0


def counter_name(kind: str) -> str:
    """The Beam counter (namespace ``beamvision``) of a progress kind."""
    return f"progress_{kind}"


class ReportProgress(beam.PTransform):
    """Counts the elements of a PCollection, or of each in a dict of them, as progress of ``kind``.

    ``kind`` is one of ``KINDS``. Give the parts of a union rather than its
    ``Flatten``: Beam's direct runner materialises a flatten of several
    stages, so its elements would be counted only once every part is done.
    Returns the counting steps' outputs, which are empty.
    """

    def __init__(self, kind: str):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"progress kind {kind!r} is not one of {KINDS}")
        self._kind = kind

    def expand(self, pcolls):
        parts = pcolls if isinstance(pcolls, dict) else {"": pcolls}
        fn = _ReportProgressFn(self._kind)
        return {name: part | f"Count{name.title()}" >> beam.ParDo(fn) for name, part in parts.items()}


class _ReportProgressFn(beam.DoFn):
    def __init__(self, kind: str):
        self._kind = kind
        self._counter = Metrics.counter(METRICS_NAMESPACE, counter_name(kind))

    def setup(self):
        folder = os.environ.get(PROGRESS_DIR_ENV)
        self._tally = _Tally.of(folder) if folder else None

    def process(self, element):
        self._counter.inc()
        if self._tally is not None:
            self._tally.add(self._kind)
        return ()

    def finish_bundle(self):
        if self._tally is not None:
            self._tally.write()


class _Tally:
    """One process's counts for one run, kept in ``FOLDER/<pid>.json``."""

    _lock = threading.Lock()  # one for every tally of the process: a few counts each, rarely written

    def __init__(self, folder: str):
        self._path = os.path.join(folder, f"{os.getpid()}.json")
        self._counts = dict.fromkeys(KINDS, 0)
        self._written = 0.0
        self._dirty = False

    @classmethod
    def of(cls, folder: str) -> _Tally:
        with cls._lock:
            if folder not in _TALLIES:
                _TALLIES[folder] = cls(folder)
            return _TALLIES[folder]

    def add(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] += 1
            self._dirty = True
            due = time.monotonic() - self._written >= WRITE_EVERY_SECONDS
        if due:
            self.write()

    def write(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            self._dirty, self._written = False, time.monotonic()
            text = json.dumps(self._counts)
            try:
                with open(self._path + ".tmp", "w") as f:
                    f.write(text)
                os.replace(self._path + ".tmp", self._path)
            except OSError:  # the run is over and its folder gone: progress is only a display
                pass


_TALLIES: dict[str, _Tally] = {}  # by folder: one per run this process works for


class LocalProgress:
    """The launcher's side of a direct run: a folder its workers report to, and the sum of their reports."""

    def __enter__(self) -> LocalProgress:
        self.folder = tempfile.mkdtemp(prefix="beamvision-progress-")
        self._before = os.environ.get(PROGRESS_DIR_ENV)
        os.environ[PROGRESS_DIR_ENV] = self.folder
        return self

    def counts(self) -> Counts:
        sums = dict.fromkeys(KINDS, 0)
        for name in os.listdir(self.folder):
            if name.endswith(".json"):
                try:
                    with open(os.path.join(self.folder, name)) as f:
                        for kind, n in json.load(f).items():
                            sums[kind] += n
                except (OSError, ValueError):  # replaced while read: the next poll gets it
                    pass
        return Counts(**sums)

    def __exit__(self, *exc) -> None:
        _TALLIES.pop(self.folder, None)  # this process's own tally of the run, if it worked for it
        if self._before is None:
            os.environ.pop(PROGRESS_DIR_ENV, None)
        else:
            os.environ[PROGRESS_DIR_ENV] = self._before
        shutil.rmtree(self.folder, ignore_errors=True)


def job_counts(result: PipelineResult, final: bool = False) -> Counts:
    """The progress counters of a job, from the runner's metrics.

    While it runs, attempted values (committed ones lag); once it is over,
    committed ones, which do not count retried bundles twice.
    """
    from apache_beam.metrics.metric import MetricsFilter

    queried = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    sums = dict.fromkeys(KINDS, 0)
    names = {counter_name(kind): kind for kind in KINDS}
    for record in queried["counters"]:
        kind = names.get(record.key.metric.name)
        if kind is not None:
            preferred, other = record.attempted, record.committed
            if final:
                preferred, other = other, preferred
            sums[kind] += preferred if preferred is not None else other or 0
    return Counts(**sums)


def console_url(result: PipelineResult, options) -> str | None:
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


def run_with_progress(
    pipeline: beam.Pipeline, title: str, every: float, detach: bool = False
) -> PipelineResult:
    """Runs ``pipeline`` to the end while its progress is shown (``console.ProgressLine``).

    A remote job is announced with its console URL; with ``detach`` it is left
    running and its result returned at once (the caller prints no summary).
    """
    if is_remote(pipeline):
        result = pipeline.run()
        url = console_url(result, pipeline.options)
        job = f"job {result.job_id()}" if hasattr(result, "job_id") else "job"
        print(f"{title}: submitted {job}" + (f": {url}" if url else ""), flush=True)
        if not detach:
            watch_job(result, ProgressLine(title, every=every))
        return result
    with LocalProgress() as local:
        line = ProgressLine(title, every=every)
        stop = threading.Event()

        def show() -> None:
            while not stop.wait(line.poll_seconds):
                line.update(local.counts())

        thread = threading.Thread(target=show, name="beamvision-progress", daemon=True)
        thread.start()
        try:
            result = pipeline.run()
            result.wait_until_finish()
        finally:
            stop.set()
            thread.join()
            line.close(local.counts())
    return result
