"""export-labels: classify results as Label Studio tasks (documented import format) and as CSV."""

from __future__ import annotations

import csv
import io
import json
import os
import urllib.parse

import pandas as pd
import pytest
from packing import regular, tar_with
from PIL import Image

from beamvision import storage
from beamvision.models import create_model
from beamvision.models.artifact import new_manifest, save_artifact
from beamvision.pipelines import classify
from beamvision.pipelines.cli import main
from beamvision.pipelines.export_labels import extract_members


@pytest.fixture(scope="module")
def classified(photos, tmp_path_factory):
    """Real photos classified by a small model: (photo folder, results folder, result rows)."""
    work = tmp_path_factory.mktemp("export")
    images = work / "photos" / "batch 1"  # a space: URLs must be quoted
    images.mkdir(parents=True)
    for i, photo in enumerate(photos):
        Image.fromarray(photo).save(images / f"photo_{i}.jpg")
    model = create_model("squeezenet", num_classes=3, input_size=32)
    manifest = new_manifest(model, "squeezenet", ["a", "b", "c"], "none", name="lab", version="7")
    save_artifact(model, manifest, str(work / "model"))
    results = str(work / "results")
    classify.run(["--input", str(images), "--model", str(work / "model"), "--output", results])
    rows = pd.concat(pd.read_parquet(p) for p in (work / "results").glob("results-*.parquet"))
    return work / "photos", results, rows


def test_label_studio_tasks_carry_the_prediction_in_the_documented_format(classified, tmp_path, capsys):
    photos, results, rows = classified
    out = tmp_path / "tasks.json"
    argv = ["export-labels", "--results", results, "--format", "labelstudio", "--output", str(out)]
    assert main([*argv, "--local_files_root", str(photos), "--from_name", "kind"]) == 0
    assert f"exported {len(rows)} images as labelstudio to {out}" in capsys.readouterr().out
    tasks = json.loads(out.read_text())
    by_uri = rows.set_index("image_uri")
    assert len(tasks) == len(rows)
    for task in tasks:
        row = by_uri.loc[task["data"]["source_uri"]]
        url = task["data"]["image"]
        assert url.startswith("/data/local-files/?d=batch%201/")
        assert str(photos / urllib.parse.unquote(url.split("?d=", 1)[1])) == task["data"]["source_uri"]
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "lab-7"
        assert prediction["score"] == pytest.approx(float(row.score))
        assert prediction["result"] == [
            {"from_name": "kind", "to_name": "image", "type": "choices", "value": {"choices": [row.label]}}
        ]


def test_the_queue_is_the_least_certain_images_and_csv_is_plain(classified, tmp_path):
    _, results, rows = classified
    out = tmp_path / "queue.csv"
    argv = ["export-labels", "--results", results, "--format", "csv", "--output", str(out), "--queue", "2"]
    assert main(argv) == 0
    with open(out) as f:
        exported = list(csv.DictReader(f))
    lowest = rows.sort_values(["score", "image_uri"]).head(2)
    assert [r["uri"] for r in exported] == list(lowest.image_uri)
    assert [r["label"] for r in exported] == list(lowest.label)


def test_local_images_need_the_document_root_and_gcs_uris_stay(classified, gcs_bucket, tmp_path, capsys):
    _, results, rows = classified
    argv = ["export-labels", "--results", results, "--format", "labelstudio"]
    assert main([*argv, "--output", str(tmp_path / "t.json")]) == 2
    assert "--local_files_root: needed for local images" in capsys.readouterr().err
    assert main([*argv, "--output", str(tmp_path / "t.json"), "--local_files_root", str(tmp_path)]) == 2
    assert "is not under it" in capsys.readouterr().err
    # Results on gs:// of images on gs://: the URIs go to Label Studio's cloud storage source as they are.
    gcs_results = f"{gcs_bucket}/results"
    gcs_rows = rows.assign(image_uri=[f"{gcs_bucket}/photos/{i}.jpg" for i in range(len(rows))])
    storage.write_atomic(f"{gcs_results}/results-00000-of-00001.parquet", gcs_rows.to_parquet(index=False))
    out = f"{gcs_bucket}/tasks.json"
    assert main(["export-labels", "--results", gcs_results, "--format", "labelstudio", "--output", out]) == 0
    tasks = json.loads(storage.read_text(out))
    assert sorted(t["data"]["image"] for t in tasks) == sorted(gcs_rows.image_uri)


def test_extraction_never_writes_outside_the_folder(photos, tmp_path):
    """A results file naming members that climb out (hand-made: classify gives such members error rows)."""
    jpeg = io.BytesIO()
    Image.fromarray(photos[0]).save(jpeg, "JPEG")
    entries = [
        regular("ok/a.jpg", jpeg.getvalue()),
        regular("../../evil.jpg", b"x"),
        regular("/abs.jpg", b"y"),
    ]
    archive = tmp_path / "in" / "we!rd name.tar"
    archive.parent.mkdir()
    archive.write_bytes(tar_with(entries))
    target = tmp_path / "deep" / "extract"
    wanted = [
        f"{archive}!/ok/a.jpg",
        f"{archive}!/../../evil.jpg",
        f"{archive}!//abs.jpg",
        f"{archive}!/ok/../../x.jpg",
    ]
    placed = extract_members(wanted, str(target))
    ((uri, path),) = placed.items()
    assert uri == f"{archive}!/ok/a.jpg" and path.startswith(str(target) + "/")
    with open(path, "rb") as f:
        assert f.read() == jpeg.getvalue()
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted([str(archive.relative_to(tmp_path)), os.path.relpath(path, tmp_path)])


def test_a_multi_label_models_label_sets_are_exported(multilabel, tmp_path, capsys):
    results = str(multilabel / "results")
    rows = pd.concat(pd.read_parquet(p) for p in (multilabel / "results").glob("results-*.parquet"))
    sets = {row.image_uri: list(row.labels) for row in rows.itertuples()}
    out = tmp_path / "tasks.json"
    argv = ["export-labels", "--results", results, "--format", "labelstudio", "--output", str(out)]
    assert main([*argv, "--local_files_root", str(multilabel)]) == 0
    tasks = json.loads(out.read_text())
    assert len(tasks) == len(rows) and any(len(chosen) > 1 for chosen in sets.values())
    for task in tasks:
        (prediction,) = task["predictions"]
        chosen = sets[task["data"]["source_uri"]]
        expected = [
            {"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": chosen}}
        ]
        assert prediction["result"] == (expected if chosen else [])
    config = (tmp_path / "tasks.label-config.xml").read_text()
    assert 'choice="multiple"' in config and config.count("<Choice value=") == 3
    out = tmp_path / "labels.csv"
    assert main(["export-labels", "--results", results, "--format", "csv", "--output", str(out)]) == 0
    with open(out) as f:
        exported = list(csv.DictReader(f))
    assert {r["uri"]: json.loads(r["labels"]) for r in exported} == sets


def test_a_single_label_models_tasks_keep_one_choice(classified, tmp_path):
    _, results, _ = classified
    out = tmp_path / "tasks.csv"
    assert main(["export-labels", "--results", results, "--format", "csv", "--output", str(out)]) == 0
    assert out.read_text().splitlines()[0] == "uri,label,score,file,duplicates"
