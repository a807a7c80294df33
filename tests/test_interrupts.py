"""Interrupts and exit statuses, as a user and a scheduler meet them: real processes, real signals.

Each test runs ``python -m beamvision`` from a working folder with relative
paths, stops it with the signal a person (Ctrl-C), a scheduler (SIGTERM) or
the kernel (SIGKILL) sends, then runs the same command again.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pyarrow.dataset as ds
import pytest
from conftest import built_once

from beamvision.exits import descendants, is_alive
from beamvision.pipelines.cli import main
from beamvision.transforms.resume import count_rows

IMAGES_PER_CLASS = 200  # 1,400 photos: a few seconds of classify, long enough to be interrupted


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> str:
    """A folder holding ``photos/<class>/*.jpg`` and ``model/`` (random weights: labels do not matter)."""

    def build(folder):
        from photos import write_photo_classes

        write_photo_classes(str(folder / "photos"), per_class=IMAGES_PER_CLASS, size=(96, 72))
        flags = ["--architecture", "mobilenet_v2", "--weights", "none", "--num_classes", "7"]
        assert main(["export", *flags, "--input_size", "96", "--output", str(folder / "model")]) == 0

    return built_once(tmp_path_factory, "interrupt-inputs", build)


def _start(cwd, *argv: str) -> tuple[subprocess.Popen, list[str]]:
    """``python -m beamvision ARGV`` in ``cwd``; its stderr lines are gathered as they come."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "beamvision", *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job has
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, lines


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _rows_in(pattern: str) -> int:
    return count_rows(sorted(glob.glob(pattern)))


def _run(cwd, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "beamvision", *argv], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _relative(inputs: str, cwd) -> tuple[str, str]:
    return os.path.relpath(os.path.join(inputs, "photos"), cwd), os.path.relpath(
        os.path.join(inputs, "model"), cwd
    )


@pytest.mark.slow
def test_ctrl_c_keeps_the_finished_rows_and_the_rerun_classifies_only_the_rest(inputs, tmp_path):
    photos, model = _relative(inputs, tmp_path)
    argv = ["classify", "--input", photos, "--model", model, "--output", "out", "--checkpoint_every", "0.2"]
    argv += ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]  # worker processes
    proc, stderr = _start(tmp_path, *argv)
    _wait_for(lambda: _rows_in(str(tmp_path / "out/_partial/results-part-*.parquet")) >= 100, proc)
    workers = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole group, Beam's workers too
    assert proc.wait(timeout=60) == 130
    time.sleep(0.5)
    assert workers and not {pid for pid in workers if is_alive(pid)}, "a worker outlived the interrupted run"
    time.sleep(0.2)  # the reader thread's last lines
    assert not any("Traceback" in line for line in stderr), "".join(stderr)
    last = stderr[-1].strip()
    found = re.fullmatch(
        r"beamvision classify: interrupted \(SIGINT\); kept up to ([\d,]+) finished rows in out/_partial; "
        r"run the same command again to classify only the rest",
        last,
    )
    assert found, last
    kept = int(found.group(1).replace(",", ""))
    assert kept >= 100
    # Nothing of the dead run is visible where readers look.
    assert not glob.glob(str(tmp_path / "out/results-*")) and not glob.glob(
        str(tmp_path / "out/summary.json")
    )

    again = _run(tmp_path, *argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"classify: resuming an interrupted run into out: up to {kept:,} rows are kept" in again.stdout
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    total = 7 * IMAGES_PER_CLASS
    assert (summary["inputs"], summary["results"], summary["resumed"]) == (total, total, kept)
    rows = ds.dataset(str(tmp_path / "out"), format="parquet", exclude_invalid_files=True).to_table()
    uris = rows.column("image_uri").to_pylist()
    assert len(uris) == len(set(uris)) == total
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        [*(f for f in os.listdir(tmp_path / "out") if f.startswith(("results-", "errors-"))), "summary.json"]
    ), "a partial folder or Beam's temporary folders were left"


@pytest.mark.slow
def test_a_killed_night_is_never_seen_by_catalog_readers_and_the_next_run_finishes_it(inputs, tmp_path):
    photos, model = _relative(inputs, tmp_path)
    argv = ["classify", "--input", photos, "--model", model, "--output", "catalog", "--incremental"]
    argv += ["--checkpoint_every", "0.2"]
    proc, _ = _start(tmp_path, *argv)
    _wait_for(lambda: _rows_in(str(tmp_path / "catalog/_partial/run=*/results-part-*.parquet")) >= 100, proc)
    proc.send_signal(signal.SIGKILL)  # a lost machine: no handler runs
    proc.wait(timeout=60)
    (partial,) = os.listdir(tmp_path / "catalog/_partial")
    # The docs' query reads run=*/results-*.parquet: the dead night has no such file.
    assert glob.glob(str(tmp_path / "catalog/run=*")) == []

    again = _run(tmp_path, *argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "classify: resuming an interrupted run into catalog/" + partial in again.stdout
    assert sorted(os.listdir(tmp_path / "catalog")) == [partial]  # the dead night's run, finished; no litter
    shards = glob.glob(str(tmp_path / "catalog/run=*/results-*.parquet"))
    uris = ds.dataset(shards, format="parquet").to_table(columns=["image_uri"]).column(0).to_pylist()
    assert len(uris) == len(set(uris)) == 7 * IMAGES_PER_CLASS


@pytest.mark.slow
def test_a_rerun_keeps_a_cut_commits_rows_and_reads_an_interrupted_archive_again(inputs, tmp_path):
    photos, model = _relative(inputs, tmp_path)
    os.makedirs(tmp_path / "shards")
    with tarfile.open(tmp_path / "shards/cats.tar", "w") as tar:
        for name in sorted(os.listdir(os.path.join(inputs, "photos", "cat")))[:20]:
            tar.add(os.path.join(inputs, "photos", "cat", name), arcname=f"scan/{name}")
    argv = ["classify", "--input", photos, "--input", "shards", "--model", model, "--output", "out"]
    argv += ["--checkpoint_every", "0.2"]
    proc, _ = _start(tmp_path, *argv)
    _wait_for(lambda: _rows_in(str(tmp_path / "out/_partial/results-part-*.parquet")) >= 300, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # A commit cut short leaves some parts already renamed to shards, and no summary.json.
    part = sorted(glob.glob(str(tmp_path / "out/_partial/results-part-*.parquet")))[0]
    os.rename(part, tmp_path / "out/results-00000-of-00009.parquet")
    kept = _rows_in(str(tmp_path / "out/_partial/*-part-*.parquet")) + _rows_in(
        str(tmp_path / "out/results-*")
    )
    members = ds.dataset(
        glob.glob(str(tmp_path / "out/_partial/results-part-*.parquet"))
        + glob.glob(str(tmp_path / "out/results-*")),
        format="parquet",
    ).to_table(columns=["image_uri"])
    member_rows = sum("cats.tar!" in uri for uri in members.column(0).to_pylist())

    again = _run(tmp_path, *argv)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    # Every file's row was kept, but the archive's: it is read again whole.
    assert summary["resumed"] == kept - member_rows
    total = 7 * IMAGES_PER_CLASS + 20
    assert (summary["inputs"], summary["results"]) == (total, total)
    rows = ds.dataset(glob.glob(str(tmp_path / "out/results-*.parquet")), format="parquet").to_table()
    uris = rows.column("image_uri").to_pylist()
    assert len(uris) == len(set(uris)) == total
    assert not os.path.exists(tmp_path / "out/_partial")


@pytest.mark.slow
def test_sigterm_in_prepare_leaves_no_unfinished_file_and_the_rerun_is_not_refused(inputs, tmp_path):
    photos, _ = _relative(inputs, tmp_path)
    argv = ["prepare", "--input", photos, "--output", "data", "--image_size", "32", "--progress_every", "0.1"]
    proc, stderr = _start(tmp_path, *argv)
    progress = re.compile(r"prepare: ([\d,]+)/")
    _wait_for(lambda: any((m := progress.match(line)) and m.group(1) != "0" for line in stderr), proc)
    proc.send_signal(signal.SIGTERM)  # what a scheduler or `docker stop` sends
    assert proc.wait(timeout=60) == 143
    time.sleep(0.2)
    assert not any("Traceback" in line for line in stderr), "".join(stderr)
    assert stderr[-1].strip() == (
        "beamvision prepare: interrupted (SIGTERM); nothing was kept (its unfinished files in data are "
        "removed); run the same command again"
    )
    assert not os.path.exists(tmp_path / "data") or os.listdir(tmp_path / "data") == []

    again = _run(tmp_path, *argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "next: beamvision train" in again.stdout


def test_a_run_whose_every_input_failed_exits_3_and_suggests_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.makedirs("photos/cat")
    for name in ("a", "b", "c"):
        (tmp_path / "photos/cat" / f"{name}.jpg").write_bytes(b"not a jpeg")
    assert main(["prepare", "--input", "photos", "--output", "data", "--image_size", "32"]) == 3
    out, err = capsys.readouterr()
    assert "next:" not in out
    assert err.strip().splitlines()[-1] == (
        "beamvision prepare: every input failed (3 of 3; --max_error_rate 0.1); the error rows are in "
        "data/errors-*.parquet"
    )


@pytest.mark.parametrize(
    ("results", "errors", "max_rate", "fails"),
    [
        (90, 10, 0.1, False),  # exactly at the bound: not over it
        (89, 11, 0.1, True),
        (0, 1, 1.0, True),  # every input failed: whatever the bound
        (1, 0, 0.0, False),
        (99, 1, 0.0, True),
        (0, 0, 0.1, False),  # nothing to fail (everything skipped)
    ],
)
def test_the_error_share_that_fails_a_run(results, errors, max_rate, fails):
    from beamvision.exits import RunFailed, Status
    from beamvision.pipelines.launch import check_errors

    report = {"results": results, "errors": errors}
    if not fails:
        check_errors(report, max_rate, "out/errors-*.parquet")
        return
    with pytest.raises(RunFailed) as raised:
        check_errors(report, max_rate, "out/errors-*.parquet")
    assert raised.value.status is Status.TOO_MANY_ERRORS
