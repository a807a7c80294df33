"""An incremental catalog over many nights: ``beamvision compact`` and the lock that keeps nights apart."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from photos import write_photo_classes

from beamvision import storage
from beamvision.pipelines.cli import main
from beamvision.transforms import catalog_lock, compaction
from beamvision.transforms.outputs import LOCK_FILE

ROW_COLUMNS = ["image_uri", "label", "score", "processed_at", "file_size"]


def _night(root: str, images: str, model: str, run_id: str) -> dict:
    argv = ["classify", "--input", images, "--model", model, "--output", root, "--incremental"]
    assert main([*argv, "--run_id", run_id, "--max_error_rate", "1"]) == 0
    return json.loads(storage.read_text(storage.join(root, f"run={run_id}", "summary.json")))


def _rows(root: str, kind: str = "results") -> list[tuple]:
    """Every row of the catalog as (the run that made it, columns...), sorted: what compaction must keep."""
    columns = ROW_COLUMNS if kind == "results" else ["image_uri", "stage", "error_type"]
    rows = []
    for shard in glob.glob(os.path.join(root, "run=*", f"{kind}-*.parquet")):
        table = pq.read_table(shard)
        run = os.path.basename(os.path.dirname(shard)).split("=", 1)[1]
        sources = table["source_run"].to_pylist() if "source_run" in table.column_names else None
        for i, row in enumerate(table.select(columns).to_pylist()):
            rows.append((sources[i] if sources else run, *row.values()))
    return sorted(rows)


def _latest_labels(root: str) -> dict[str, str]:
    """The docs' latest-label query (docs/scheduled-runs.md), as a dict."""
    shards = glob.glob(os.path.join(root, "run=*/results-*.parquet"))
    results = ds.dataset(shards, format="parquet", partitioning="hive", partition_base_dir=root)
    frame = results.to_table(columns=["image_uri", "label", "score", "processed_at", "run"]).to_pandas()
    latest = frame.sort_values("processed_at").groupby("image_uri").tail(1)
    return dict(zip(latest["image_uri"], latest["label"], strict=True))


def _bucket(folder, count: int) -> None:
    """``count`` crops of each of 7 real photos under ``folder``/<class>/."""
    write_photo_classes(str(folder), count, size=(48, 40))


@pytest.mark.slow
def test_compact_folds_nights_losslessly_and_later_nights_skip_what_they_classified(
    nightly_models, tmp_path, capsys
):
    images, root = tmp_path / "bucket", str(tmp_path / "catalog")
    _bucket(images / "first", 2)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    first = _night(root, str(images), nightly_models["1"], "20261201T030000Z")
    _bucket(images / "second", 2)
    second = _night(root, str(images), nightly_models["1"], "20261202T030000Z")
    other_model = _night(root, str(images), nightly_models["2"], "20261203T030000Z")
    assert (first["errors"], second["skipped"], other_model["skipped"]) == (1, first["inputs"], 0)
    results, errors, latest = _rows(root), _rows(root, "errors"), _latest_labels(root)
    capsys.readouterr()

    # 8 rows a bucket: the night after looks its files up in 4 buckets (14 + 14 results)
    assert main(["compact", "--catalog", root, "--shard_rows", "8"]) == 0
    out = capsys.readouterr().out
    compacted = os.path.join(root, "run=compacted-20261202T030000Z")
    assert f"2 runs -> {compacted}" in out and "6 files -> 9" in out, out
    runs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "run=*")))
    # version 2's one run has nothing to fold with; version 1's two are one partition now
    assert runs == ["run=20261203T030000Z", "run=compacted-20261202T030000Z"]
    assert (_rows(root), _rows(root, "errors"), _latest_labels(root)) == (results, errors, latest)
    summary = json.loads(storage.read_text(os.path.join(compacted, "summary.json")))
    assert summary["compacted"]["runs"] == ["20261201T030000Z", "20261202T030000Z"]
    assert summary["compacted"]["buckets"] == 4
    assert (summary["results"], summary["model"]["version"]) == (first["results"] + second["results"], "1")
    assert not os.path.exists(os.path.join(root, LOCK_FILE))

    # The next night reads the compacted run: only the new files are classified, the broken one not retried.
    _bucket(images / "third", 1)
    third = _night(root, str(images), nightly_models["1"], "20261204T030000Z")
    new_files = len(glob.glob(str(images / "third" / "*" / "*.jpg")))
    assert (third["results"], third["errors"], third["skipped"]) == (new_files, 0, second["inputs"])

    # Compacting again folds the compacted run with the newer one; rows keep their own run.
    results = _rows(root)
    assert main(["compact", "--catalog", root]) == 0
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "run=*"))) == [
        "run=20261203T030000Z",
        "run=compacted-20261204T030000Z",
    ]
    assert _rows(root) == results
    capsys.readouterr()
    assert main(["compact", "--catalog", root]) == 0
    assert "nothing to fold" in capsys.readouterr().out


def test_a_cut_compaction_keeps_every_row_and_the_same_command_finishes_it(
    nightly_models, tmp_path, capsys, monkeypatch
):
    images, root = tmp_path / "bucket", str(tmp_path / "catalog")
    _bucket(images / "first", 1)
    _night(root, str(images), nightly_models["1"], "r1")
    _bucket(images / "second", 1)
    _night(root, str(images), nightly_models["1"], "r2")
    results = _rows(root)
    real_delete = compaction.delete_runs

    def cut(root_, runs):  # SIGINT right after the commit, before the folded runs are deleted
        raise KeyboardInterrupt

    monkeypatch.setattr(compaction, "delete_runs", cut)
    capsys.readouterr()
    assert main(["compact", "--catalog", root]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("beamvision compact: interrupted (SIGINT); every row is kept"), line
    assert not os.path.exists(os.path.join(root, LOCK_FILE))  # let go on the interrupt
    # Folded and still in place: a night skips the same files either way.
    night = _night(root, str(images), nightly_models["1"], "r3")
    assert (night["results"], night["skipped"]) == (0, night["inputs"])

    monkeypatch.setattr(compaction, "delete_runs", real_delete)
    assert main(["compact", "--catalog", root]) == 0
    out = capsys.readouterr().out
    assert "deleted 2 runs that an interrupted compaction had folded" in out, out
    assert _rows(root) == results  # no row twice, none lost (r3 classified nothing)
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "run=*"))) == ["run=compacted-r3"]


@pytest.mark.slow
def test_overlapping_nights_are_refused_while_one_holds_the_catalog(nightly_models, tmp_path, capsys):
    images, root = tmp_path / "bucket", str(tmp_path / "catalog")
    _bucket(images, 60)
    argv = [
        "classify",
        "--input",
        str(images),
        "--model",
        nightly_models["1"],
        "--output",
        root,
        "--incremental",
    ]
    night = subprocess.Popen(
        [sys.executable, "-m", "beamvision", *argv, "--run_id", "first"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = os.path.join(root, LOCK_FILE)
    deadline = time.monotonic() + 120
    while not os.path.exists(lock) and night.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(lock), night.communicate()
    assert json.loads(storage.read_text(lock))["pid"] == night.pid
    try:
        assert main([*argv, "--run_id", "second"]) == 2
        refused = capsys.readouterr().err.strip()
        assert refused.count("\n") == 0, refused
        assert f"pid {night.pid} on {socket.gethostname()}" in refused and lock in refused, refused
        assert main(["compact", "--catalog", root]) == 2
        assert "classify --incremental (run first)" in capsys.readouterr().err
    finally:
        _out, err = night.communicate(timeout=300)
    assert night.returncode == 0, err
    assert not os.path.exists(lock)
    assert not os.path.exists(os.path.join(root, "run=second"))
    # The night that held the lock is whole: every image has its row.
    summary = json.loads(storage.read_text(os.path.join(root, "run=first", "summary.json")))
    assert summary["results"] == len(glob.glob(str(images / "*" / "*.jpg")))
    assert len(_rows(root)) == summary["results"]


def test_a_lock_whose_holder_ended_is_taken_over_and_a_live_one_is_refused(tmp_path):
    root = str(tmp_path / "catalog")
    os.makedirs(os.path.join(root, "run=done"))
    storage.write_atomic(os.path.join(root, "run=done", "summary.json"), b"{}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    lock = os.path.join(root, LOCK_FILE)
    for stale in (
        {"command": "classify --incremental", "host": here, "pid": dead.pid},  # killed -9
        {"command": "classify --incremental", "host": "elsewhere", "pid": 1, "run": "done"},  # committed
    ):
        storage.write_atomic(lock, json.dumps(stale).encode())
        with catalog_lock.take(root, "compact", "--catalog") as taken:
            assert json.loads(storage.read_text(lock))["token"] == taken.record["token"]
        assert not os.path.exists(lock)

    alive = {"host": here, "pid": os.getppid(), "command": "classify --incremental", "run": "tonight"}
    remote_job = {"host": here, "pid": dead.pid, "command": "classify --incremental", "job": "2026-12-05_x"}
    elsewhere = {"host": "elsewhere", "pid": dead.pid, "command": "compact", "started": "2026-12-05T03:00:00"}
    for holder in (alive, remote_job, elsewhere):
        storage.write_atomic(lock, json.dumps(holder).encode())
        with pytest.raises(catalog_lock.CatalogBusy) as refused:
            catalog_lock.take(root, "compact", "--catalog")
        assert f"pid {holder['pid']} on {holder['host']}" in str(refused.value)
        assert f"delete {lock} if it is no longer running" in str(refused.value)
        assert json.loads(storage.read_text(lock)) == holder  # left as it was
    assert refused.value.status == 2


def test_compact_refuses_a_folder_that_is_no_catalog(tmp_path, capsys):
    assert main(["compact", "--catalog", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"beamvision compact: error: --catalog {tmp_path / 'nowhere'}: holds no run "
        "(a catalog is the --output of classify --incremental)"
    )
    assert not os.path.exists(tmp_path / "nowhere")


def test_compact_on_cloud_storage(nightly_models, gcs_bucket, tmp_path, capsys):
    root = f"{gcs_bucket}/catalog"
    images = tmp_path / "bucket"
    _bucket(images / "first", 1)
    _night(root, str(images), nightly_models["1"], "r1")
    _bucket(images / "second", 1)
    second = _night(root, str(images), nightly_models["1"], "r2")
    assert main(["compact", "--catalog", root, "--shard_rows", "3"]) == 0  # 14 results: 5 buckets
    assert len(storage.match_sizes(f"{root}/run=compacted-r2/results-*")) == 5
    runs = {uri.rsplit("/", 2)[-2] for uri in storage.list_files(root)}
    assert runs == {"run=compacted-r2"}, runs
    night = _night(root, str(images), nightly_models["1"], "r3")
    assert (night["results"], night["skipped"]) == (0, second["inputs"])
    assert not storage.exists(f"{root}/{LOCK_FILE}")
