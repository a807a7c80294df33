"""Commands that follow each other, as a new user types them: relative paths, a space, the printed commands.

One spelling of a file (``storage.canonical``): rows hold absolute paths
however ``--input`` was typed, and every reader (evaluate's truth, prepare's
labels CSV and Label Studio export, ``--input_list``) takes relative,
absolute and ``file://`` spellings of one file as the same file. Every
command the tool prints is run here, after the command that may write beside
it. And failing fast and plainly: an unknown ``--runner``, storage that
cannot be reached.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import subprocess
import sys
import time

import pandas as pd
import pytest
from packing import pack
from photos import CLASSES, write_photo_classes

from beamvision import storage
from beamvision.models import create_model
from beamvision.models.artifact import new_manifest, save_artifact
from beamvision.pipelines.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """An untrained squeezenet at 32 px over the photo classes: what these walks need is rows."""
    network = create_model("squeezenet", num_classes=len(CLASSES), input_size=32)
    uri = str(tmp_path_factory.mktemp("model") / "m")
    save_artifact(
        network, new_manifest(network, "squeezenet", list(CLASSES), "none", name="p", version="1"), uri
    )
    return uri


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> str:
    """A current directory whose path holds a space, as a user's "My photos" folder does."""
    folder = tmp_path / "my photos"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return str(folder)


def _rows(folder: str, prefix: str = "results") -> pd.DataFrame:
    return pd.concat(
        pd.read_parquet(p) for p in sorted(glob.glob(f"{glob.escape(folder)}/{prefix}-*.parquet"))
    )


def _printed(out: str, head: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(head)).split(": ", 1)[1]


def test_relative_classify_absolute_truth_then_every_printed_command(model, workdir, capsys):
    write_photo_classes("data/holdout", per_class=2, size=(48, 36))
    assert main(["classify", "--input", "data/holdout", "--model", model, "--output", "runs/holdout-1"]) == 0
    out = capsys.readouterr().out
    rows = _rows("runs/holdout-1")
    assert len(rows) == 2 * len(CLASSES)
    assert all(uri.startswith(os.path.join(workdir, "data", "holdout") + "/") for uri in rows.image_uri)
    assert f"classified {len(rows)} of {len(rows)} images, 0 errors, in " in out

    # The truth names the files absolutely, one of them as file://; the results came from a relative run.
    paths = sorted(glob.glob(os.path.join(workdir, "data/holdout/*/*.jpg")))
    lines = ["uri,label", f"file://{paths[0]},{paths[0].split('/')[-2]}"]
    lines += [f"{p},{p.split('/')[-2]}" for p in paths[1:]]
    with open("truth.csv", "w") as f:
        f.write("\n".join(lines) + "\n")
    assert main(["evaluate", "--results", "runs/holdout-1", "--truth", "truth.csv"]) == 0
    said = capsys.readouterr().out
    assert f"on {len(paths)} labelled images" in said and "0 labelled images have no result" in said
    metrics = json.loads(storage.read_text("runs/holdout-1-evaluation/metrics.json"))  # its own folder
    assert metrics["examples"] == len(paths) and metrics["results_without_label"] == 0
    assert not {"metrics.json", "confusion_matrix.png"} & set(os.listdir("runs/holdout-1"))

    # Written into the results folder on purpose, evaluate's files still do not trouble the readers.
    assert (
        main(["evaluate", "--results", "runs/holdout-1", "--truth", "folders", "--output", "runs/holdout-1"])
        == 0
    )
    capsys.readouterr()
    assert {"metrics.json", "confusion_matrix.png"} <= set(os.listdir("runs/holdout-1"))
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])  # this venv's python
    read = subprocess.run(
        _printed(out, "read them: "),
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",  # the printed command works from any directory
        env={**os.environ, "PATH": path},
    )
    assert read.returncode == 0, read.stderr
    assert len(read.stdout.splitlines()) == 10 and all(
        r.startswith("{'image_uri': '/") for r in read.stdout.splitlines()
    )
    review = shlex.split(_printed(out, "review them: "))
    assert (
        review[:2] == ["beamvision", "review"] and review[review.index("--results") + 1] == "runs/holdout-1"
    )
    assert main(review[1:]) == 0
    assert os.path.exists("runs/holdout-1-review/index.html")

    # A truth that names none of the results: one line, how many matched and an example of each side.
    with open("other.csv", "w") as f:
        f.write("uri,label\nelsewhere/a.jpg,cat\n")
    assert main(["evaluate", "--results", "runs/holdout-1", "--truth", "other.csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "0 of its 1 URI match one of the 14 results" in err
    assert f"truth e.g. {workdir}/elsewhere/a.jpg" in err and f"results e.g. {paths[0]}" in err


def test_a_run_of_one_broken_file_prints_no_rate_and_singular_counts(model, workdir, capsys):
    os.makedirs("in")
    with open("in/broken.jpg", "wb") as f:
        f.write(b"not a jpeg")
    assert main(["classify", "--input", "in", "--model", model, "--output", "out"]) == 3  # every input failed
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("classified 0 of 1 image, 1 error, in ") and "images/s" not in out[0]
    assert "errors by stage and type (1 row in out/errors-*.parquet):" in out
    assert f"  1  decode NotAnImage, e.g. {workdir}/in/broken.jpg: not a recognised image file" in out


@pytest.mark.slow  # about 25 s on 2 CPUs: classify, review, export-labels, prepare thrice, classify, train
def test_label_studio_round_trip_from_a_relative_archive_folder(model, workdir, capsys):
    written = write_photo_classes("photos", per_class=3, size=(48, 36))
    os.makedirs("arch2")
    members = {f"{c}/{os.path.basename(p)}": open(p, "rb").read() for c in CLASSES[:3] for p in written[c]}  # noqa: SIM115
    pack("arch2/shard-000.tar.gz", members)
    assert main(["classify", "--input", "arch2", "--model", model, "--output", "runs/a"]) == 0
    out = capsys.readouterr().out
    archive = os.path.join(workdir, "arch2", "shard-000.tar.gz")
    assert set(_rows("runs/a").image_uri) == {f"{archive}!/{name}" for name in members}
    assert main(shlex.split(_printed(out, "review them: "))[1:]) == 0  # its folder has a space in it

    argv = ["export-labels", "--results", "runs/a", "--format", "labelstudio", "--output", "tasks.json"]
    assert main([*argv, "--local_files_root", ".", "--extract_to", "served"]) == 0
    tasks = json.loads(open("tasks.json").read())  # noqa: SIM115
    assert {t["data"]["source_uri"] for t in tasks} == set(_rows("runs/a").image_uri)

    def reviewed(task, relative: bool) -> dict:
        uri = task["data"]["source_uri"]
        truth = uri.split("!/", 1)[1].split("/")[0]
        data = {**task["data"], "source_uri": os.path.relpath(uri) if relative else uri}
        result = [
            {"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": [truth]}}
        ]
        return {"id": 1, "data": data, "annotations": [{"id": 1, "result": result}]}

    # An export of these tasks, and one as a relative classify of old wrote it (source_uri relative).
    for name, relative in (("export.json", False), ("export-relative.json", True)):
        with open(name, "w") as f:
            json.dump([reviewed(t, relative) for t in tasks], f)
        prepared = f"prepared-{name}"
        flags = ["--labels", name, "--output", prepared, "--image_size", "32", "--test_fraction", "0.2"]
        assert main(["prepare", "--input", "arch2", *flags]) == 0
        out = capsys.readouterr().out
        stats = json.loads(storage.read_text(f"{prepared}/stats.json"))
        assert (stats["examples"], stats["errors"]) == (len(members), 0), stats["error_groups"]
        train = shlex.split(_printed(out, "next: ").split(" (every", 1)[0])
        assert train[train.index("--data") + 1] == prepared
    # The printed train command runs as it is (a model folder in place of MODEL_DIR, one short epoch).
    train = [f"{workdir}/model one" if word == "MODEL_DIR" else word for word in train]
    assert main([*train[1:], "--epochs", "1", "--batch_size", "4"]) == 0
    capsys.readouterr()
    assert os.path.exists(f"{workdir}/model one/manifest.json")

    # A labels CSV in three spellings, and an --input_list of relative lines, name the same members.
    names = sorted(members)
    spellings = [
        f"arch2/shard-000.tar.gz!/{names[0]}",
        f"file://{archive}!/{names[1]}",
        f"./arch2/../arch2/shard-000.tar.gz!/{names[2]}",
    ]
    with open("labels.csv", "w") as f:
        f.write(
            "uri,label\n"
            + "".join(f"{u},{n.split('/')[0]}\n" for u, n in zip(spellings, names[:3], strict=True))
        )
    flags = ["--labels", "labels.csv", "--output", "prepared-csv", "--image_size", "32"]
    assert main(["prepare", "--input", "arch2", *flags, "--val_fraction", "0", "--test_fraction", "0"]) == 0
    capsys.readouterr()
    stats = json.loads(storage.read_text("prepared-csv/stats.json"))
    assert (stats["examples"], stats["errors"]) == (3, 0), stats["error_groups"]
    with open("list.txt", "w") as f:
        f.write("".join(f"{u}\n" for u in spellings))
    assert main(["classify", "--input_list", "list.txt", "--model", model, "--output", "runs/listed"]) == 0
    capsys.readouterr()
    assert sorted(_rows("runs/listed").image_uri) == sorted(f"{archive}!/{n}" for n in names[:3])


def test_an_unknown_runner_is_one_line_listing_the_runners(model, workdir, capsys):
    argv = ["classify", "--input", "in", "--model", model, "--output", "out", "--runner", "SparkRunnr"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "beamvision classify: error: --runner SparkRunnr: unknown runner; choose from DirectRunner, "
        "PrismRunner, FlinkRunner, SparkRunner, PortableRunner, DataflowRunner"
    )


@pytest.mark.parametrize("host", ["http://127.0.0.1:{port}", "http://storage.invalid:{port}"])
def test_unreachable_storage_fails_fast_in_one_line(host, workdir):
    """A gs:// model, the README's Dataflow dry run, with Cloud Storage out of reach: one line, exit 1."""
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "STORAGE_EMULATOR_HOST": host.format(port=port)}
    argv = ["classify", "--input", "gs://my-bucket/incoming/**", "--model", "gs://my-bucket/models/photos"]
    argv += ["--output", "gs://my-bucket/runs/1", "--runner", "DataflowRunner", "--dry_run"]
    argv += ["--project", "p", "--region", "us-central1", "--temp_location", "gs://my-bucket/tmp"]
    started = time.monotonic()
    ran = subprocess.run(
        [sys.executable, "-m", "beamvision", *argv], env=env, capture_output=True, text=True, timeout=120
    )
    elapsed = time.monotonic() - started
    assert ran.returncode == 1, ran.stderr[-3000:]
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1, ran.stderr[-3000:]
    assert lines[0].startswith("beamvision classify: error: gs://my-bucket/models/photos/manifest.json: ")
    assert (
        "cannot reach" in lines[0] and "check STORAGE_EMULATOR_HOST" in lines[0] and "my-bucket" in lines[0]
    )
    assert elapsed < 30


def test_a_reachable_server_s_passing_faults_are_still_retried(gcs_bucket, gcs_emulator, monkeypatch):
    """The up-front check only asks whether the host answers: a 503 from it is the client's to retry."""
    import http.client
    import http.server
    import threading
    import urllib.parse

    storage.write_atomic(f"{gcs_bucket}/notes.txt", b"still here")
    upstream = urllib.parse.urlsplit(gcs_emulator)
    faults = {"left": 2, "sent": 0}

    class FlakyProxy(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if faults["left"]:
                faults["left"] -= 1
                faults["sent"] += 1
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            connection.request(self.command, self.path, body or None, headers)
            reply = connection.getresponse()
            data = reply.read()
            self.send_response(reply.status)
            for key, value in reply.getheaders():
                if key.lower() not in ("transfer-encoding", "content-length", "connection"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_address[1]}")
        assert storage.read_bytes(f"{gcs_bucket}/notes.txt") == b"still here"
    finally:
        server.shutdown()
    assert faults == {"left": 0, "sent": 2}


def test_missing_credentials_fail_fast_in_one_line(workdir, tmp_path):
    """Cloud Storage reachable (here: an HTTPS proxy on loopback), no credentials: one line, exit 1."""
    import socket

    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        env = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
        env.update(
            HTTPS_PROXY=f"http://127.0.0.1:{proxy.getsockname()[1]}",
            GOOGLE_APPLICATION_CREDENTIALS=str(tmp_path / "no-such-key.json"),
            HOME=str(tmp_path),  # no gcloud configuration either
        )
        argv = ["classify", "--input", "in", "--model", "gs://my-bucket/models/photos", "--output", "out"]
        started = time.monotonic()
        ran = subprocess.run(
            [sys.executable, "-m", "beamvision", *argv], env=env, capture_output=True, text=True, timeout=120
        )
    assert ran.returncode == 1, ran.stderr[-3000:]
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1, ran.stderr[-3000:]
    assert "gs://my-bucket/models/photos/manifest.json: no Google Cloud credentials found" in lines[0]
    assert (
        "gcloud auth application-default login" in lines[0] and "GOOGLE_APPLICATION_CREDENTIALS" in lines[0]
    )
    assert time.monotonic() - started < 30


def test_evaluating_a_catalog_run_leaves_the_catalog_one_table(tmp_path):
    """evaluate's and review's default folders beside ``ROOT/run=ID`` are no Hive partition of ROOT."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from beamvision.pipelines.reports import evaluation_dir, review_dir

    run = tmp_path / "catalog" / "run=20261128T031500Z"
    run.mkdir(parents=True)
    pq.write_table(
        pa.table({"image_uri": ["/a.jpg"], "label": ["cat"]}), run / "results-00000-of-00001.parquet"
    )
    for folder in (evaluation_dir(str(run)), review_dir(f"{run}/")):
        os.makedirs(folder)
        with open(os.path.join(folder, "metrics.json"), "w") as f:
            f.write("{}")
    assert evaluation_dir(str(run)) == str(tmp_path / "catalog" / "_run=20261128T031500Z-evaluation")
    assert evaluation_dir("runs/first") == "runs/first-evaluation"
    table = ds.dataset(str(tmp_path / "catalog"), format="parquet", partitioning="hive").to_table()
    assert table.column("run").to_pylist() == ["20261128T031500Z"]
