"""What a run prints: the quiet start's filters, progress lines, a remote job followed, the summary."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import pytest
from apache_beam.metrics.execution import MetricKey, MetricResult
from apache_beam.metrics.metricbase import MetricName
from apache_beam.runners.runner import PipelineState
from terminal import STARTUP_NOISE, progress_lines

from beamvision import console, stderr_filter
from beamvision.models.training import epoch_line
from beamvision.pipelines import launch
from beamvision.pipelines.cli import main
from beamvision.pipelines.reports import format_error_groups
from beamvision.transforms.write import merge_error_groups

# Lines as TensorFlow 2.21, absl and gRPC print them (from a classify run before the quiet start).
TF_LINES = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    b"I0000 00:00:1796170445.825179   10943 port.cc:153] oneDNN custom operations are on. You may see "
    b"slightly different numerical results due to floating-point round-off errors.",
    b"I0000 00:00:1796170445.826713   10943 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
    b"GPU will not be used.",
    b"E1202 00:01:02.123456    4242 cuda_executor.cc:1228] failed call to cuInit: UNKNOWN ERROR (303)",
    b"W1202 00:01:02.123456    4242 external/local_xla/xla/tsl/lib/monitoring/collection_registry.cc:81] x",
    b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
    b"fully_quantize: 0, inference_type: 6, input_inference_type: UINT8, output_inference_type: FLOAT32",
]
KEPT_LINES = [
    b"E1202 00:01:02.123456    4242 op_kernel.cc:1830] OP_REQUIRES failed: an error of C++ is shown",
    b"F1202 00:01:02.123456    4242 tensor.cc:10] Check failed: a fatal error is always shown",
    b"beamvision classify: error: argument --top_k: expected a positive integer, received '0'",
    b"Traceback (most recent call last):",
    b"WARNING beamvision: a warning of ours",
    b"I0000 is not a log line without its location",
]


@pytest.mark.parametrize("line", TF_LINES)
def test_the_filter_drops_tensorflow_absl_and_grpc_lines(line):
    assert stderr_filter.is_noise(line)


@pytest.mark.parametrize("line", KEPT_LINES)
def test_the_filter_keeps_everything_else(line):
    assert not stderr_filter.is_noise(line)


def test_the_filter_copies_a_stream_in_order_and_a_partial_line_at_once():
    source_read, source_write = os.pipe()
    target_read, target_write = os.pipe()
    copier = threading.Thread(target=stderr_filter.copy, args=(source_read, target_write))
    copier.start()
    os.write(source_write, b"first\n" + TF_LINES[1] + b"\nsec")
    os.write(source_write, b"ond\n" + TF_LINES[0] + b"\n")
    os.write(source_write, b"Enter a value: ")  # no newline: shown after a short wait, not held back
    assert _read_until(target_read, b"Enter a value: ") == b"first\nsecond\nEnter a value: "
    os.write(source_write, TF_LINES[2])  # a noise line cut off by the end of the stream
    os.close(source_write)
    copier.join(timeout=10)
    os.close(target_write)
    assert os.read(target_read, 1000) == b""


def _read_until(fd: int, end: bytes) -> bytes:
    import select

    data = b""
    while not data.endswith(end):
        ready, _, _ = select.select([fd], [], [], 10)
        assert ready, f"nothing more after {data!r}"
        data += os.read(fd, 1000)
    return data


@pytest.mark.parametrize(
    ("argv", "quiet", "verbose"),
    [
        (["classify", "--input", "x"], False, False),
        (["classify", "--quiet"], True, False),
        (["train", "--verbose", "--data", "d"], False, True),
        (["train", "--verbose", "false", "--data", "d"], False, False),
        (["train", "--verbose=1", "--quiet=false"], False, True),
        (["train", "--verbose=perhaps"], False, False),  # the parser names the bad value
        (["classify", "--", "--verbose"], False, False),
    ],
)
def test_the_verbosity_switches_are_read_before_any_import(argv, quiet, verbose):
    assert (console.requested(argv, "--quiet"), console.requested(argv, "--verbose")) == (quiet, verbose)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["models", "--quiet", "--verbose"],
            "beamvision models: error: argument --verbose: not allowed with argument --quiet",
        ),
        (["models", "--verbose=perhaps"], "argument --verbose: expected true or false, received 'perhaps'"),
    ],
)
def test_verbosity_mistakes_are_one_line(capsys, argv, expected):
    assert main(argv) == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]


def _record(name: str, level: int, path: str = "/x/app.py", message: str = "m", args=()) -> logging.LogRecord:
    return logging.LogRecord(name, level, path, 1, message, args, None)


@pytest.mark.parametrize(
    ("record", "shown"),
    [
        (_record("root", logging.WARNING, "/v/site-packages/apache_beam/ml/inference/base.py"), False),
        (_record("apache_beam.runners.worker", logging.WARNING), False),
        (_record("tensorflow", logging.WARNING), False),
        (_record("absl", logging.WARNING), False),
        (_record("apache_beam.runners.worker", logging.ERROR), True),
        (_record("beamvision.transforms.concurrency", logging.WARNING), True),
        (_record("google.auth", logging.WARNING, "/v/site-packages/google/auth/_default.py"), True),
        (_record("root", logging.WARNING, "/home/me/script.py"), True),
    ],
)
def test_quiet_logging_hides_library_noise_not_our_warnings_nor_errors(record, shown):
    assert console._quiet_filter(record) is shown


def _log_entry(severity: str, location: str, message: str) -> str:
    """A worker's LogEntry as text, as Beam relays it to the launching process."""
    from apache_beam.portability.api import beam_fn_api_pb2

    entry = beam_fn_api_pb2.LogEntry(
        severity=getattr(beam_fn_api_pb2.LogEntry.Severity.Enum, severity),
        message=message,
        log_location=location,
    )
    return str(entry).replace("\n", " ")


@pytest.mark.parametrize("relay", ["portable", "in-process"])
def test_a_relayed_worker_record_is_shown_as_its_own_message_when_ours(relay):
    """Beam relays what its workers log: ours is shown as the worker's, Beam's own warnings are not."""
    import beamvision.transforms.read

    def relayed(severity: str, level: int, location: str, message: str) -> logging.LogRecord:
        text = _log_entry(severity, location, message)
        if relay == "portable":  # the portable runner's job service: "Worker: %s" on its logger
            return _record(console.WORKER_RELAY_LOGGER, level, message="Worker: %s", args=(text,))
        # FnApiRunner's logging service: the entry's text on the root logger, from worker_handlers.py
        return _record("root", level, f"/v/site-packages/{console.WORKER_HANDLERS_FILE}", message=text)

    beam_noise = relayed(
        "WARN", logging.WARNING, "/v/apache_beam/ml/inference/base.py:2201", "Resource module"
    )
    assert not console._quiet_filter(beam_noise)
    ours = relayed("WARN", logging.WARNING, f"{beamvision.transforms.read.__file__}:88", 'slow "bucket"')
    assert console._quiet_filter(ours)
    assert (ours.name, ours.getMessage()) == ("worker", 'slow "bucket"')
    elsewhere = relayed(
        "WARN", logging.WARNING, "/home/me/beamvision/notes.py:3", "a folder named beamvision"
    )
    assert not console._quiet_filter(elsewhere)
    failure = relayed(
        "ERROR", logging.ERROR, "/v/apache_beam/runners/worker/sdk_worker.py:3", "bundle failed"
    )
    assert console._quiet_filter(failure) and failure.getMessage() == "bundle failed"


def test_progress_lines_say_what_is_known():
    unknown = console.format_progress("classify", console.Counts(), 3.0, None)
    assert unknown == "classify: 0 images [00:03, ? images/s, 0 errors]"
    starting = console.format_progress("classify", console.Counts(inputs=800), 5.0, None)
    assert starting == "classify: 0/800 images (0%) [00:05<?, ? images/s, 0 errors]"  # no guess from start-up
    counts = console.Counts(inputs=800, results=400, errors=12)
    line = console.format_progress("classify", counts, 30.0, 20.0)
    assert line == "classify: 412/800 images (52%) [00:30<00:19, 20.0 images/s, 12 errors]"
    assert progress_lines(line, "classify") == [{"done": 412, "total": 800, "rate": 20.0, "errors": 12}]
    large = console.format_progress("prepare", console.Counts(inputs=1_200_000, results=1000), 10.0, 100.0)
    assert large.startswith("prepare: 1,000/1,200,000 images (0%) [00:10<3:19:50, 100.0 images/s")
    skipping = console.format_progress("classify", console.Counts(10, 2, 0, 8), 1.0, 0.5)
    assert skipping.endswith(
        "[00:01<00:00, 0.5 images/s, 0 errors, 8 skipped]"
    )  # a slow rate stays per second


def test_a_plain_progress_line_comes_every_few_seconds_and_once_at_the_end(capsys, monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 6.0, 7.0, 11.0, 12.0, 12.5])
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    console.configure()
    line = console.ProgressLine("prepare", every=5.0)  # t=0
    assert not line.redraws and line.poll_seconds == 1.0  # counts every second, for the rate
    for done in (0, 10, 30, 40):  # t = 1, 2, 6, 7
        line.update(console.Counts(inputs=100, results=done))
    line.update(console.Counts(inputs=100, results=90, errors=10))  # t = 11
    line.close(console.Counts(inputs=100, results=90, errors=10))  # t = 12: the same counts, not again
    printed = progress_lines(capsys.readouterr().err, "prepare")
    assert [(p["done"], p["errors"]) for p in printed] == [(30, 0), (100, 10)]
    # The rate is of the window since the last moment with nothing done (t=1): 30 in 5 s.
    assert printed[0]["rate"] == 6.0


def test_quiet_prints_no_progress(capsys):
    console.configure(quiet=True)
    try:
        line = console.ProgressLine("classify", every=0.0)
        line.update(console.Counts(inputs=5, results=5))
        line.close(console.Counts(inputs=5, results=5))
    finally:
        console.configure()
    assert capsys.readouterr().err == ""


class _DataflowResult:
    """A DataflowPipelineResult's answers: the job's states over time, its counters (no Dataflow here).

    ``wait_until_finish`` waits as Beam's does, through the states, and raises
    as Beam's does when the job ends in another state than DONE.
    """

    def __init__(
        self, states: list[str], counters: list[dict[str, int]], final: dict[str, int] | None = None
    ):
        self._states, self._counters, self._final = states, counters, final
        self.polls = 0
        self._ended = threading.Event()

    def job_id(self):
        return "2026-12-02_01_02_03-42"

    def wait_until_finish(self):
        for _ in self._states:
            self._ended.wait(0.05)
        self._ended.set()
        if self._states[-1] != PipelineState.DONE:
            raise RuntimeError(f"Dataflow pipeline failed. State: {self._states[-1]}")
        return PipelineState.DONE

    def metrics(self):
        result = self

        class _Metrics:
            def query(self, _filter):
                if result._ended.is_set() and result._final is not None:
                    attempted, committed = result._final, result._final
                else:
                    attempted = result._counters[min(result.polls, len(result._counters) - 1)]
                    committed = {}
                    result.polls += 1
                step = "ClassifyImages/FormatResults"
                names = [*sorted(set(attempted) | set(committed)), "batches"]
                return {
                    "counters": [
                        MetricResult(
                            MetricKey(step, MetricName("beamvision", name)),
                            committed.get(name),
                            attempted.get(name, 9),
                        )
                        for name in names
                    ],
                    "distributions": [],
                    "gauges": [],
                }

        return _Metrics()


def _follow(job: _DataflowResult, capsys) -> list[dict]:
    console.configure()
    launch.watch_job(job, console.ProgressLine("classify", every=0.0), interval=0.04)
    return progress_lines(capsys.readouterr().err, "classify")


def test_a_dataflow_job_is_followed_from_its_counters_to_the_end(capsys):
    counters = [
        {},  # the job is starting: no counter yet
        {"progress_inputs": 500, "progress_results": 120},
        {"progress_inputs": 1000, "progress_results": 995, "progress_errors": 10},  # a retried bundle counted
    ]
    final = {"progress_inputs": 1000, "progress_results": 990, "progress_errors": 10}
    states = [PipelineState.PENDING, PipelineState.RUNNING, PipelineState.RUNNING, PipelineState.DONE]
    lines = _follow(_DataflowResult(states, counters, final), capsys)
    assert lines[0] == {"done": 0, "total": None, "rate": None, "errors": 0}
    assert {"done": 120, "total": 500} in [{k: line[k] for k in ("done", "total")} for line in lines]
    assert (lines[-1]["done"], lines[-1]["total"], lines[-1]["errors"]) == (
        1000,
        1000,
        10,
    )  # committed counts


def test_a_failed_dataflow_job_raises_as_beam_does(capsys):
    job = _DataflowResult([PipelineState.RUNNING, PipelineState.FAILED], [{"progress_inputs": 3}])
    with pytest.raises(RuntimeError, match="State: FAILED"):
        _follow(job, capsys)


def test_the_console_url_names_region_job_and_project():
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(["--project", "my-proj", "--region", "europe-west4"])
    url = launch.console_url(_DataflowResult([PipelineState.DONE], []), options)
    assert (
        url
        == "https://console.cloud.google.com/dataflow/jobs/europe-west4/2026-12-02_01_02_03-42?project=my-proj"
    )


def test_detach_needs_a_remote_runner(capsys, tmp_path):
    argv = [
        "prepare",
        "--input",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
        "--image_size",
        "32",
        "--detach",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "beamvision prepare: error: --detach: a DirectRunner job runs on this machine and ends with this "
        "process; only a Dataflow job can be left running (--runner DataflowRunner)"
    ]


def test_error_groups_count_each_stage_and_type_with_its_first_uri():
    merged = merge_error_groups([(1, "b.jpg", "bad b"), (2, "a.jpg", "bad a"), (1, "c.jpg", "bad c")])
    assert merged == (4, "a.jpg", "bad a")
    assert merge_error_groups([merged, (1, "0.jpg", "bad 0")]) == (5, "0.jpg", "bad 0")
    groups = [
        {"stage": "decode", "error_type": "UnidentifiedImageError", "count": 1200, "sample_uri": "gs://b/x.jpg",
         "sample_message": "cannot identify\nimage file"},
        {"stage": "read", "error_type": "FileNotFoundError", "count": 3, "sample_uri": "gs://b/gone.jpg",
         "sample_message": "x" * 300},
    ]  # fmt: skip
    lines = format_error_groups(groups, "gs://b/out")
    assert lines[0] == "errors by stage and type (1,203 rows in gs://b/out/errors-*.parquet):"
    assert lines[1] == "  1,200  decode UnidentifiedImageError, e.g. gs://b/x.jpg: cannot identify image file"
    assert (
        lines[2].startswith("      3  read FileNotFoundError, e.g. gs://b/gone.jpg: xxx")
        and len(lines[2]) < 160
    )
    assert format_error_groups([], "out") == []


def test_an_epoch_line_has_the_metrics_in_order_and_the_time_left():
    logs = {
        "val_accuracy": 0.9,
        "accuracy": 0.8812,
        "val_loss": 0.39,
        "loss": 0.41234,
        "learning_rate": 0.001,
    }
    line = epoch_line("train", 2, 20, logs, 12.34, 207.0)
    assert line == (
        "train epoch 3/20: loss 0.4123, accuracy 0.8812, val_loss 0.3900, val_accuracy 0.9000 "
        "(12.3s, 03:27 left)"
    )
    assert epoch_line("trial 4", 19, 20, {"loss": 1.0}, 1.0, 0.0) == "trial 4 epoch 20/20: loss 1.0000 (1.0s)"


@pytest.mark.slow
def test_verbose_brings_tensorflows_start_up_lines_back(tmp_path):
    """With --verbose, TensorFlow's C++ lines show: the filter, not TensorFlow, is what hides them.

    (A plain run's stderr has none of them: test_classify and test_deploy check it on classify runs.)
    """
    argv = [sys.executable, "-m", "beamvision", "export", "--architecture", "squeezenet", "--weights", "none"]
    verbose = subprocess.run(
        [*argv, "--output", str(tmp_path / "v"), "--verbose"], capture_output=True, text=True, timeout=300
    )
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    # (TensorFlow's oneDNN line shows only on CPUs it turns oneDNN on for: not on an AMD EPYC.)
    assert STARTUP_NOISE[0] in verbose.stderr and "Could not find cuda drivers" in verbose.stderr
