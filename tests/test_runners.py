"""Runners: what the default runs, Prism by name, and every command on Beam's portable runner.

The portable tests start Beam's Python job service and an external SDK worker
pool on loopback (``portable_runner``): the way Flink, Spark and Dataflow
Runner v2 run Python, with the job service standing in for Flink's or
Spark's job server. classify, prepare, review and tune run through
``--runner PortableRunner``; each accounts for every input, and classify's
progress line moves while the job runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from photos import write_photo_classes
from terminal import progress_lines

from beamvision.models.artifact import load_artifact, new_manifest, save_artifact
from beamvision.pipelines import classify
from beamvision.pipelines.cli import main
from beamvision.transforms.runners import new_pipeline, sees_local_disk


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], port: int, log: str) -> subprocess.Popen:
    """A Beam service in its own process group, on ``port``; waits until it listens."""
    # The worker pool starts each SDK worker as `python`: this interpreter's, with beamvision.
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                with open(log) as f:
                    raise RuntimeError(f"{argv[2]} did not start: {f.read()[-2000:]}") from None
            time.sleep(0.2)


@pytest.fixture(scope="module")
def portable_runner(tmp_path_factory):
    """Beam's job service and an external worker pool on loopback; yields the flags that reach them."""
    logs = tmp_path_factory.mktemp("portable")
    jobs, pool = _free_port(), _free_port()
    services = [
        _start(
            [
                sys.executable,
                "-m",
                "apache_beam.runners.portability.local_job_service_main",
                "--port",
                str(jobs),
            ],
            jobs,
            str(logs / "job_service.log"),
        ),
        _start(
            [
                *(sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main"),
                *("--service_port", str(pool)),
            ],
            pool,
            str(logs / "worker_pool.log"),
        ),
    ]
    yield [
        *("--runner", "PortableRunner", "--job_endpoint", f"localhost:{jobs}"),
        *("--environment_type", "EXTERNAL", "--environment_config", f"localhost:{pool}"),
    ]
    for proc in services:  # the pool's SDK workers too: each service leads its own process group
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Real photos (7 classes, 60 each, one of them cut short) and an untrained 7-class model."""
    from beamvision.models import create_model

    work = tmp_path_factory.mktemp("runners")
    written = write_photo_classes(str(work / "photos"), per_class=60, size=(64, 48))
    broken = written["cat"][0]
    with open(broken, "rb") as f:
        data = f.read()
    with open(broken, "wb") as f:
        f.write(data[: len(data) // 3])
    model = create_model("squeezenet", num_classes=7, input_size=32)
    save_artifact(model, new_manifest(model, "squeezenet", sorted(written), "none"), str(work / "model"))
    return work, sum(len(paths) for paths in written.values())


def _rows(output: str, kind: str) -> pd.DataFrame:
    frame = pd.read_parquet([os.path.join(output, f) for f in os.listdir(output) if f.startswith(f"{kind}-")])
    return frame.drop(columns=["processed_at"]).sort_values("image_uri").reset_index(drop=True)


def test_the_default_runner_is_beams_fn_api_runner_and_never_tries_prism(tiny, tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner

    for argv in ([], ["--runner", "DirectRunner"], ["--runner", "direct"]):
        assert isinstance(new_pipeline(PipelineOptions(argv)).runner, FnApiRunner), argv
    # As a user runs it, with Beam's logs shown: no Prism attempt (online it would download and run Prism).
    root, _ = tiny
    command = [
        sys.executable,
        "-m",
        "beamvision",
        "prepare",
        "--input",
        root,
        "--output",
        str(tmp_path / "d"),
    ]
    ran = subprocess.run(
        [*command, "--image_size", "32", "--verbose"], capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "Running pipeline with" not in ran.stderr, ran.stderr[-3000:]  # Beam's words when it tries Prism
    assert "prism" not in (ran.stdout + ran.stderr).lower()


def test_prism_by_name_is_checked_before_the_job(tiny, tmp_path, capsys, monkeypatch):
    root, _ = tiny
    argv = [
        "prepare",
        "--input",
        root,
        "--output",
        str(tmp_path / "d"),
        "--image_size",
        "32",
        "--runner",
        "PrismRunner",
    ]
    missing = str(tmp_path / "no-such-prism")
    for location, what in [
        (missing, "no such file"),
        ("http://example.com/prism.zip", "not a Beam release's URL"),
    ]:
        assert main([*argv, "--prism_location", location]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"beamvision prepare: error: --prism_location {location}: {what}; give a Prism binary, "
            "its release zip, or the URL of either on https://github.com/apache/beam/releases"
        ]
    # Without --prism_location Beam downloads its release from GitHub, which a test cannot reach for sure:
    # here the download goes to a closed port instead, into an empty cache.
    from apache_beam.runners.portability.prism_runner import PrismJobServer

    closed = f"http://127.0.0.1:{_free_port()}/prism.zip"
    monkeypatch.setattr(PrismJobServer, "BIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(PrismJobServer, "_construct_download_url", staticmethod(lambda *_: closed))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(
        "beamvision prepare: error: --runner PrismRunner: could not fetch Beam's Prism release ("
    )
    assert err.rstrip().endswith("leave out --runner to run on this machine without Prism")
    assert not os.path.exists(tmp_path / "d")


@pytest.mark.parametrize(
    "flags, local",
    [
        ("", True),
        ("--runner PrismRunner", True),  # Prism's default environment is LOOPBACK
        ("--runner PortableRunner --job_endpoint localhost:8099", False),  # Docker containers
        ("--runner PortableRunner --environment_type LOOPBACK", True),
        ("--runner FlinkRunner", True),  # Flink embedded in its job server: LOOPBACK
        ("--runner FlinkRunner --flink_master flink-jm:8081", False),
        ("--runner SparkRunner", True),  # local[4]
        ("--runner SparkRunner --spark_master_url spark://spark-master:7077", False),
        ("--runner FlinkRunner --environment_type EXTERNAL --environment_config 127.0.0.1:50000", True),
        ("--runner FlinkRunner --environment_type EXTERNAL --environment_config flink-tm:50000", False),
        (
            "--runner PortableRunner --environment_type PROCESS --environment_config {} "
            "--job_endpoint localhost:8099",
            True,
        ),
        (
            "--runner SparkRunner --environment_type PROCESS --environment_config {} "
            "--job_endpoint spark-master:8099",
            False,
        ),
    ],
)
def test_which_runners_workers_see_this_machines_disk(flags, local):
    from apache_beam.options.pipeline_options import PipelineOptions

    boot = json.dumps({"command": "/opt/apache/beam/boot"})  # a PROCESS environment's worker command
    assert sees_local_disk(new_pipeline(PipelineOptions(flags.replace("{}", boot).split()))) is local


@pytest.mark.slow
def test_classify_on_a_portable_runner_accounts_for_every_image_with_live_progress(
    portable_runner, workspace, tmp_path
):
    work, inputs = workspace
    photos, model = str(work / "photos"), str(work / "model")
    output = str(tmp_path / "portable")
    command = [sys.executable, "-m", "beamvision", "classify", "--input", photos, "--model", model]
    ran = subprocess.run(
        [*command, "--output", output, *portable_runner, "--progress_every", "0.2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    results, errors = _rows(output, "results"), _rows(output, "errors")
    assert (len(results), len(errors)) == (inputs - 1, 1)
    with open(os.path.join(output, "summary.json")) as f:
        summary = json.load(f)
    assert (summary["inputs"], summary["results"], summary["errors"]) == (inputs, inputs - 1, 1)
    # The progress line came from the pool's workers while the job ran, not only at its end.
    lines = progress_lines(ran.stderr, "classify")
    assert any(0 < line["done"] < inputs for line in lines), ran.stderr[-3000:]
    assert (lines[-1]["done"], lines[-1]["total"], lines[-1]["errors"]) == (inputs, inputs, 1)
    # The same rows as the default runner's.
    direct = str(tmp_path / "direct")
    classify.run(["--input", photos, "--model", model, "--output", direct])
    pd.testing.assert_frame_equal(_rows(direct, "errors"), errors)
    direct_results = _rows(direct, "results")
    pd.testing.assert_frame_equal(
        direct_results.drop(columns="top_k_scores"), results.drop(columns="top_k_scores")
    )
    np.testing.assert_allclose(
        np.stack(direct_results.top_k_scores), np.stack(results.top_k_scores), rtol=1e-5
    )


@pytest.mark.slow
def test_prepare_review_and_tune_on_a_portable_runner(portable_runner, workspace, tmp_path, capsys):
    work, inputs = workspace
    data = str(tmp_path / "data")
    argv = ["prepare", "--input", str(work / "photos"), "--output", data, "--image_size", "32"]
    assert main([*argv, *portable_runner]) == 0
    with open(os.path.join(data, "stats.json")) as f:
        stats = json.load(f)
    assert (stats["inputs"], stats["examples"], stats["errors"]) == (inputs, inputs - 1, 1)
    assert sum(stats["totals"].values()) == inputs - 1

    results = str(tmp_path / "results")
    classify.run(["--input", str(work / "photos"), "--model", str(work / "model"), "--output", results])
    report = str(tmp_path / "report")
    assert main(["review", "--results", results, "--output", report, *portable_runner]) == 0
    assert f"reviewed {inputs - 1} results and 1 error" in capsys.readouterr().out
    assert os.path.exists(os.path.join(report, "index.html"))

    space = tmp_path / "space.yaml"
    space.write_text("learning_rate: [0.001, 0.01]\nepochs: 1\nbatch_size: 16\narchitecture: squeezenet\n")
    out = str(tmp_path / "tune")
    assert (
        main(
            [
                "tune",
                "--data",
                data,
                "--output",
                out,
                "--space",
                str(space),
                "--search",
                "grid",
                *portable_runner,
            ]
        )
        == 0
    )
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert (summary["trials"], summary["completed"], summary["failed"]) == (2, 2, 0)
    best = load_artifact(os.path.join(out, "best"))
    assert best.manifest.training["trial"]["trial_id"] == summary["best"]["trial_id"]
