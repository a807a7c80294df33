"""beamvision classify end to end: the odd-and-broken corpus row by row, local and gs://,
one and two workers, the Dataflow job graph, and user mistakes."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shlex
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import built_once, most_bytes_held
from corpus import write_corpus
from terminal import assert_no_startup_noise, progress_lines

from beamvision import storage
from beamvision.models import create_model
from beamvision.models.artifact import load_artifact, new_manifest, save_artifact
from beamvision.pipelines import classify
from beamvision.pipelines.cli import main
from beamvision.transforms.decode import decode_image

SIZE = 32
LABELS = [f"kind_{i}" for i in range(10)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A mobilenet_v2 artifact of 10 classes at 32 px; built once for all xdist workers (``built_once``)."""

    def build(folder):
        model = create_model("mobilenet_v2", num_classes=len(LABELS), input_size=SIZE)
        # Freshly initialised, the network gives every image nearly uniform
        # probabilities; larger weights make its outputs differ, so rows are comparable.
        model.set_weights([w * np.float32(3.0) if w.ndim > 1 else w for w in model.get_weights()])
        manifest = new_manifest(model, "mobilenet_v2", LABELS, "none", name="corpus", version="1")
        save_artifact(model, manifest, str(folder / "mnv2"))

    return os.path.join(built_once(tmp_path_factory, "classify-model", build), "mnv2")


@pytest.fixture(scope="module")
def corpus_dir(corpus, tmp_path_factory):
    """The corpus written once for all xdist workers; (its root, absolute path -> expected)."""
    folder = built_once(
        tmp_path_factory, "classify-corpus", lambda f: write_corpus(str(f / "corpus"), corpus)
    )
    root = os.path.join(folder, "corpus")  # below the folder: built_once's marker is no input
    return root, {os.path.join(root, relative): outcome for relative, (_, outcome) in corpus.items()}


def _read_rows(output: str, prefix: str) -> pd.DataFrame:
    files = sorted(
        m.path for m in storage.FileSystems.match([f"{output}/{prefix}-*.parquet"])[0].metadata_list
    )
    assert files, f"no {prefix} shards in {output}"
    tables = []
    for uri in files:
        local = f"/tmp/{os.getpid()}-{os.path.basename(uri)}"
        storage.download(uri, local)
        tables.append(pq.read_table(local))
        os.remove(local)
    return pd.concat([t.to_pandas() for t in tables], ignore_index=True)


def _decoded_pixels(uris) -> np.ndarray:
    """What decode_image gives for each local file, as one uint8 batch."""
    batch = []
    for uri in uris:
        with open(uri, "rb") as f:
            batch.append(decode_image(f.read(), SIZE).pixels)
    return np.stack(batch)


@pytest.fixture(scope="module")
def one_worker_run(model_dir, corpus_dir, tmp_path_factory):
    """One in-process run over the corpus, with overlapping patterns and a list file.

    Run once for all xdist workers (``built_once``): the tests only read its output.
    """
    root, expected = corpus_dir
    missing = os.path.join(root, "gone.jpg")

    def build(work):
        listed = work / "list.txt"
        first_ok = next(p for p, e in expected.items() if not e.error_type)
        listed.write_text(f"{first_ok}\n\n{missing}\n{missing}\n")
        classify.run(_corpus_argv(root, str(listed), model_dir, str(work / "out")))

    output = os.path.join(built_once(tmp_path_factory, "classify-run1", build), "out")
    return output, {**expected, missing: None}


def _corpus_argv(root: str, listed: str, model_dir: str, output: str) -> list[str]:
    """Classify's flags for the corpus: overlapping patterns, a list file, top 3, batches of 4, embeddings.

    A third of the corpus is broken on purpose: --max_error_rate 1 (exit 3 only if every input failed).
    """
    patterns = ["--input", root, "--input", os.path.join(root, "formats", "*.jpg"), "--input_list", listed]
    return [
        *patterns,
        "--model",
        model_dir,
        "--output",
        output,
        "--top_k",
        "3",
        "--batch_size",
        "4",
        "--embeddings",
        "--max_error_rate",
        "1",
    ]


def test_every_input_is_exactly_one_row(one_worker_run):
    output, expected = one_worker_run
    results, errors = _read_rows(output, "results"), _read_rows(output, "errors")
    uris = list(results.image_uri) + list(errors.image_uri)
    assert sorted(uris) == sorted(expected)  # nothing lost, nothing twice
    with open(os.path.join(output, "summary.json")) as f:
        summary = json.load(f)
    assert summary["inputs"] == len(expected)
    assert (summary["results"], summary["errors"]) == (len(results), len(errors))
    assert summary["complete"] is True
    assert summary["model"]["name"] == "corpus" and summary["model"]["version"] == "1"
    groups = errors.groupby(["stage", "error_type"]).image_uri.agg(["size", "min"])
    assert sorted(
        (g["stage"], g["error_type"], g["count"], g["sample_uri"]) for g in summary["error_groups"]
    ) == sorted((stage, kind, n, sample) for (stage, kind), (n, sample) in groups.iterrows())
    counts = sorted(results.label.value_counts().items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
    assert [(x["label"], x["count"]) for x in summary["top_labels"]] == counts[:20]
    assert (summary["model"]["engine"], summary["model"]["precision"]) == ("tensorflow", "fp32")
    # Start-up, from the job's metrics: the model loads, then the first batch comes, within the run.
    timing = summary["timing"]
    assert 0 < timing["model_load_seconds"] < timing["first_batch_seconds"] < summary["seconds"]


def test_each_corpus_file_has_the_expected_row(one_worker_run):
    output, expected = one_worker_run
    results = _read_rows(output, "results").set_index("image_uri")
    errors = _read_rows(output, "errors").set_index("image_uri")
    for uri, outcome in expected.items():
        if outcome is None:  # listed but missing
            assert errors.loc[uri, "stage"] == "read"
            assert errors.loc[uri, "error_type"] == "FileNotFoundError"
            assert pd.isna(errors.loc[uri, "sha256"])  # nothing was read
        elif outcome.error_type:
            assert errors.loc[uri, "stage"] == "decode", uri
            assert errors.loc[uri, "error_type"] == outcome.error_type, uri
            assert errors.loc[uri, "message"], uri
            with open(uri, "rb") as f:  # a decode error row names the exact bytes that failed
                assert errors.loc[uri, "sha256"] == hashlib.sha256(f.read()).hexdigest(), uri
        else:
            row = results.loc[uri]
            assert (row.width, row.height, row.format) == (outcome.width, outcome.height, outcome.format), uri
            assert (row.model_name, row.model_version) == ("corpus", "1")
            assert row.file_size == os.path.getsize(uri), uri
            with open(uri, "rb") as f:
                assert row.sha256 == hashlib.sha256(f.read()).hexdigest(), uri
            assert abs(row.file_modified.timestamp() - os.path.getmtime(uri)) < 1e-5, uri


def test_results_equal_model_predict_on_the_same_pixels(one_worker_run, model_dir):
    output, _ = one_worker_run
    results = _read_rows(output, "results")
    artifact = load_artifact(model_dir)
    pixels = _decoded_pixels(results.image_uri)
    probabilities = artifact.model.predict(pixels, verbose=0)
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :3]
    labels_checked = 0
    for i, row in enumerate(results.itertuples()):
        top = probabilities[i][order[i]]
        np.testing.assert_allclose(row.top_k_scores, top, rtol=1e-5, atol=1e-7)
        assert list(row.top_k_scores) == sorted(row.top_k_scores, reverse=True)
        assert row.score == row.top_k_scores[0] and row.label == row.top_k_labels[0]
        distinct = np.diff(top) < -1e-6  # labels are only comparable where scores differ
        if distinct[0]:
            assert row.label == LABELS[order[i][0]]
            labels_checked += 1
        assert len(set(row.top_k_labels)) == 3
    assert labels_checked >= len(results) // 2


def test_embeddings_are_the_pooled_features_before_the_classifier(one_worker_run, model_dir):
    output, _ = one_worker_run
    results = _read_rows(output, "results").head(5)
    model = load_artifact(model_dir).model
    features = keras.Model(model.inputs, model.get_layer("predictions").input)
    pixels = _decoded_pixels(results.image_uri)
    np.testing.assert_allclose(
        np.stack(results.embedding), features.predict(pixels, verbose=0), rtol=1e-4, atol=1e-5
    )


def test_output_schema(one_worker_run):
    output, _ = one_worker_run
    shard = sorted(glob.glob(os.path.join(output, "results-*-of-*.parquet")))[0]
    schema = pq.read_schema(shard)
    assert [(f.name, str(f.type)) for f in schema] == [
        ("image_uri", "string"),
        ("label", "string"),
        ("score", "float"),
        ("top_k_labels", "list<item: string>"),
        ("top_k_scores", "list<item: float>"),
        ("width", "int32"),
        ("height", "int32"),
        ("format", "string"),
        ("file_size", "int64"),
        ("file_modified", "timestamp[us, tz=UTC]"),
        ("sha256", "string"),
        ("model_name", "string"),
        ("model_version", "string"),
        ("processed_at", "timestamp[us, tz=UTC]"),
        ("embedding", "list<item: float>"),
    ]
    errors = pq.read_schema(sorted(glob.glob(os.path.join(output, "errors-*-of-*.parquet")))[0])
    assert errors.names == [
        "image_uri",
        "stage",
        "error_type",
        "message",
        "file_size",
        "file_modified",
        "sha256",
        "processed_at",
    ]


# Two processes each with its own model, then sharing one (Beam's model_copies), every count set by flag.
SHARED_MODEL = ["--model_copies", "1", "--read_threads", "2", "--decode_threads", "1"]
SHARED_MODEL += ["--inference_threads", "1"]


def _check_what_a_run_prints(ran: subprocess.CompletedProcess, output: str, inputs: int) -> None:
    """No start-up noise; progress up to the final count; a summary that groups errors and says what next."""
    assert_no_startup_noise(ran.stderr)
    errors = _read_rows(output, "errors")
    lines = progress_lines(ran.stderr, "classify")
    assert len(lines) >= 3, ran.stderr
    done = [line["done"] for line in lines]
    assert done == sorted(done) and (done[-1], lines[-1]["total"], lines[-1]["errors"]) == (
        inputs,
        inputs,
        len(errors),
    )
    assert any(line["total"] == inputs and line["done"] < inputs for line in lines)  # the total came first
    assert any(line["rate"] for line in lines)
    printed = ran.stdout.splitlines()
    assert f"classified {inputs - len(errors)} of {inputs} images, {len(errors)} errors" in printed[0]
    rows = f"{len(errors)} row" + ("" if len(errors) == 1 else "s")
    start = printed.index(f"errors by stage and type ({rows} in {output}/errors-*.parquet):")
    groups = errors.groupby(["stage", "error_type"]).image_uri.agg(["size", "min"])
    shown = [line.split(", e.g. ")[0].split() for line in printed[start + 1 : start + 1 + len(groups)]]
    assert sorted(shown) == sorted([str(n), stage, kind] for (stage, kind), n in groups["size"].items())
    for (stage, kind), sample in groups["min"].items():
        assert any(f" {stage} {kind}, e.g. {sample}: " in line for line in printed)
    # The command it gives to read the results runs, and prints them.
    command = shlex.split(next(line for line in printed if line.startswith("read them: ")).split(": ", 1)[1])
    assert command[:2] == ["python", "-c"]
    shown = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    rows = shown.stdout.splitlines()
    assert len(rows) == min(10, inputs - len(errors))
    assert all(row.startswith("{'image_uri': ") for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("sizing", [[], SHARED_MODEL], ids=["model-per-process", "one-shared-model"])
def test_two_workers_give_the_same_rows_as_one(one_worker_run, model_dir, corpus_dir, tmp_path, sizing):
    from apache_beam.metrics.metric import MetricsFilter

    output, expected = one_worker_run
    root, _ = corpus_dir
    listed = os.path.join(os.path.dirname(output), "list.txt")
    two = str(tmp_path / "two")
    argv = _corpus_argv(root, listed, model_dir, two)
    argv += ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing", *sizing]
    if sizing:
        result = classify.run(argv)
    else:  # as a user runs it, its output captured (not a terminal): what it prints is checked too
        command = [sys.executable, "-m", "beamvision", "classify", *argv, "--progress_every", "0.5"]
        ran = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert ran.returncode == 0, ran.stderr[-3000:]
        _check_what_a_run_prints(ran, two, len(expected))

    def comparable(out):
        results = _read_rows(out, "results").drop(columns=["processed_at"]).sort_values("image_uri")
        errors = _read_rows(out, "errors").drop(columns=["processed_at"]).sort_values("image_uri")
        return results.reset_index(drop=True), errors.reset_index(drop=True)

    (r1, e1), (r2, e2) = comparable(output), comparable(two)
    pd.testing.assert_frame_equal(e1, e2)
    pd.testing.assert_frame_equal(
        r1.drop(columns=["top_k_scores", "embedding"]), r2.drop(columns=["top_k_scores", "embedding"])
    )
    np.testing.assert_allclose(np.stack(r1.top_k_scores), np.stack(r2.top_k_scores), rtol=1e-5)
    with open(os.path.join(two, "summary.json")) as f:
        workers = json.load(f)["model"]["workers"]
    assert workers["processes_per_machine"] == 2
    if sizing:
        assert workers == {
            "processes_per_machine": 2,
            "read_threads": 2,
            "decode_threads": 1,
            "inference_threads": 1,
            "model_copies": 1,
        }
        # Beam records each model load in our namespace: the two processes loaded one model between them.
        loads = result.metrics().query(MetricsFilter().with_name("load_model_latency_milli_secs"))
        assert sum((d.committed or d.attempted).count for d in loads["distributions"]) == 1


def test_gcs_input_model_and_output(corpus, model_dir, gcs_bucket, capsys):
    for relative, (data, _) in list(corpus.items())[:8]:
        storage.write_atomic(f"{gcs_bucket}/images/{relative}", data)
    model_uri = f"{gcs_bucket}/models/mnv2"
    artifact = load_artifact(model_dir)
    save_artifact(artifact.model, artifact.manifest, model_uri)
    output = f"{gcs_bucket}/runs/1"
    assert (
        main(["classify", "--input", f"{gcs_bucket}/images", "--model", model_uri, "--output", output]) == 0
    )
    printed = capsys.readouterr().out
    results, errors = _read_rows(output, "results"), _read_rows(output, "errors")
    expected = {f"{gcs_bucket}/images/{r}": e for r, (_, e) in list(corpus.items())[:8]}
    assert sorted([*results.image_uri, *errors.image_uri]) == sorted(expected)
    for row in results.itertuples():
        assert (row.width, row.height) == (expected[row.image_uri].width, expected[row.image_uri].height)
    summary = json.loads(storage.read_text(f"{output}/summary.json"))
    assert summary["inputs"] == 8 and summary["complete"]
    assert f"classified {len(results)} of 8 images" in printed


def test_dataflow_job_graph_builds(model_dir, gcs_bucket, capsys):
    result = classify.run(
        [
            "--input",
            f"{gcs_bucket}/images/**",
            "--model",
            model_dir,
            "--output",
            f"{gcs_bucket}/out",
            "--runner",
            "DataflowRunner",
            "--dry_run",
            "--project",
            "beamvision-test",
            "--region",
            "us-central1",
            "--temp_location",
            f"{gcs_bucket}/tmp",
        ]
    )
    assert "dry run: built the DataflowRunner job graph" in capsys.readouterr().out
    names = {t.unique_name for t in result.job.proto_pipeline.components.transforms.values()}
    steps = ("MatchInputs", "LookUpFiles", "ReadFiles", "GroupArchives", "DecodeImages", "ClassifyImages")
    for step in (*steps, "WriteResults"):
        assert step in names


def test_a_batch_that_fails_gives_one_inference_error_row_per_image(model_dir):
    """Pixels of the wrong size make the compiled model refuse the batch: a real inference failure."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from beamvision.transforms.inference import BeamvisionModelHandler, ClassifyImages
    from beamvision.transforms.rows import ImageKey

    keys = [ImageKey(f"/images/{i}.png", width=16, height=16, format="PNG") for i in range(6)]
    handler = BeamvisionModelHandler(model_dir, batch_size=4, top_k=3)
    with TestPipeline() as p:
        images = p | beam.Create([(key, np.zeros((SIZE // 2, SIZE // 2, 3), np.uint8)) for key in keys])
        out = images | ClassifyImages(handler, "corpus", "1")
        assert_that(out["results"], equal_to([]), label="NoResults")
        rows = out["errors"] | beam.Map(lambda row: (row["image_uri"], row["stage"], bool(row["message"])))
        assert_that(rows, equal_to([(key.uri, "inference", True) for key in keys]), label="OneRowEach")


def test_a_dry_run_reads_and_writes_nothing_under_output(one_worker_run, model_dir, corpus_dir, capsys):
    output, _ = one_worker_run
    root, _ = corpus_dir

    def state():
        return {name: os.stat(os.path.join(output, name)).st_mtime_ns for name in os.listdir(output)}

    before = state()
    for extra in (
        ["--overwrite"],
        ["--dry_run=true"],
        [],
        ["--incremental"],
    ):  # a used --output is no reason to refuse
        argv = ["--input", root, "--model", model_dir, "--output", output, "--dry_run", *extra]
        assert classify.run(argv) is None
        assert "dry run: built the DirectRunner job graph" in capsys.readouterr().out
    assert state() == before


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--top_k", "11"], "--top_k 11: the model has only 10 classes"),
        (["--batch_size", "0"], "argument --batch_size: expected a positive integer, received '0'"),
        (["--runer", "DataflowRunner"], "unrecognized arguments: --runer DataflowRunner"),
        (["--direct_num_workers", "two"], "argument --direct_num_workers: invalid int value: 'two'"),
        (["--input_list", "/no/list.txt"], "--input_list /no/list.txt: no such file"),
    ],
)
def test_bad_flags_give_one_line(extra, expected, model_dir, tmp_path, capsys):
    argv = [
        "classify",
        "--input",
        str(tmp_path),
        "--model",
        model_dir,
        "--output",
        str(tmp_path / "o"),
        *extra,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_the_launcher_validates_the_artifact_without_building_the_model(
    model_dir, tmp_path, monkeypatch, capsys
):
    def build(*args, **kwargs):
        raise AssertionError("the launcher built the model")

    monkeypatch.setattr(keras.saving, "load_model", build)  # a dry run runs no worker: only the launcher
    argv = ["--input", str(tmp_path), "--model", model_dir, "--output", str(tmp_path / "o"), "--dry_run"]
    assert classify.run(argv) is None
    assert "dry run: built the DirectRunner job graph" in capsys.readouterr().out


def test_bad_model_fails_before_any_work(tmp_path, capsys):
    output = tmp_path / "out"
    assert (
        main(
            ["classify", "--input", str(tmp_path), "--model", str(tmp_path / "nope"), "--output", str(output)]
        )
        == 2
    )
    assert "no model artifact at" in capsys.readouterr().err
    assert not output.exists()


def test_listed_uris_are_file_names_not_globs(model_dir, photos, tmp_path):
    from PIL import Image

    names = ["a[1].jpg", "what?.jpg", "star*.jpg", "a1.jpg"]  # a[1] as a glob would match a1.jpg
    for name, photo in zip(names, photos, strict=False):
        Image.fromarray(photo).save(tmp_path / name)
    listed = [str(tmp_path / name) for name in names[:3]]
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    output = str(tmp_path / "out")
    classify.run(["--input_list", str(tmp_path / "list.txt"), "--model", model_dir, "--output", output])
    assert sorted(_read_rows(output, "results").image_uri) == sorted(listed)
    with open(os.path.join(output, "summary.json")) as f:
        assert json.load(f)["errors"] == 0


def test_a_pattern_that_matches_nothing_says_so_in_one_line(model_dir, tmp_path, capsys):
    pattern = str(tmp_path / "nothing-here" / "*.jpg")
    assert main(["classify", "--input", pattern, "--model", model_dir, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"beamvision classify: error: --input {pattern}: matched no file; nothing was classified"


def test_a_pattern_among_several_that_matches_nothing_is_reported(model_dir, photos, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(photos[0]).save(tmp_path / "one.jpg")
    typo = str(tmp_path / "*.jpeg")
    output = str(tmp_path / "out")
    argv = ["classify", "--input", str(tmp_path / "*.jpg"), "--input", typo, "--model", model_dir]
    assert main([*argv, "--output", output]) == 0
    assert f"WARNING: --input {typo} matched no file" in capsys.readouterr().out
    with open(os.path.join(output, "summary.json")) as f:
        summary = json.load(f)
    assert (summary["results"], summary["unmatched_patterns"]) == (1, [typo])


def test_large_files_are_read_and_decoded_within_the_byte_budget(model_dir, photos, tmp_path):
    """Uncompressed scans of 6.9 MB (9 MB of pixels) among JPEGs: --buffer_mb bounds what is held."""
    from PIL import Image

    from beamvision.transforms.concurrency import PROCESS_BYTES

    paths = []
    for i in range(6):
        scan = tmp_path / "in" / f"scan_{i}.tiff"
        scan.parent.mkdir(exist_ok=True)
        Image.fromarray(photos[i % len(photos)]).resize((1500, 1530)).save(scan, "TIFF")
        photo = tmp_path / "in" / f"photo_{i}.jpg"
        Image.fromarray(photos[i % len(photos)]).save(photo)
        paths += [str(scan), str(photo)]
    scan_bytes = os.path.getsize(paths[0])
    peaks = {}
    for buffer_mb in (8, 64):
        output = str(tmp_path / f"out_{buffer_mb}")
        argv = ["--input", str(tmp_path / "in"), "--model", model_dir, "--output", output]
        result = classify.run([*argv, "--buffer_mb", str(buffer_mb), "--batch_size", "4"])
        assert sorted(_read_rows(output, "results").image_uri) == sorted(paths)
        peaks[buffer_mb] = most_bytes_held(result)
    # At 8 MB a scan is read and decoded alone: its bytes, its pixels (4 bytes each) and a few JPEGs.
    assert scan_bytes < peaks[8] <= scan_bytes + 1500 * 1530 * 4 + 2 * 2**20
    assert peaks[64] > 2 * scan_bytes  # with room, several files are in flight at once
    assert PROCESS_BYTES.used == 0


def test_missing_input_and_existing_output(model_dir, one_worker_run, tmp_path, capsys):
    assert main(["classify", "--model", model_dir, "--output", str(tmp_path)]) == 2
    assert "give at least one --input PATTERN or an --input_list FILE" in capsys.readouterr().err
    output, _ = one_worker_run
    assert main(["classify", "--input", str(tmp_path), "--model", model_dir, "--output", output]) == 2
    assert "already holds results" in capsys.readouterr().err
