"""beamvision review: the static report of a classify output, checked in headless Chromium.

Real photos (files, archive members, an exact duplicate, a broken file, a file
named like markup) are classified, then reviewed; the page must load with no
console error and no script, every thumbnail must render, and hostile names
must show as text.
"""

from __future__ import annotations

import os
import pathlib

import pandas as pd
import pytest
from browser import visit
from packing import pack
from photos import write_photo_classes

from beamvision import storage
from beamvision.models import create_model
from beamvision.models.artifact import new_manifest, save_artifact
from beamvision.pipelines import classify, reports, review
from beamvision.pipelines.cli import main

HOSTILE = "<img src=x onerror=alert(1)>.jpg"
HOSTILE_LABEL = "<b>bold</b>"


@pytest.fixture(scope="module")
def classified(tmp_path_factory):
    """A classify output over photos in a folder and a tar: (work dir, results dir, rows)."""
    work = tmp_path_factory.mktemp("review")
    photos = work / "photos"
    written = write_photo_classes(str(photos), per_class=3, size=(96, 72))
    first = written["cat"][0]
    with open(first, "rb") as f:
        cat = f.read()
    (photos / "copies").mkdir()
    (photos / "copies" / "same-cat.jpg").write_bytes(cat)  # an exact duplicate
    (photos / "copies" / HOSTILE).write_bytes(cat)  # and one named like markup
    (photos / "copies" / "broken.jpg").write_bytes(cat[: len(cat) // 3])
    pack(
        str(photos / "more.tar.gz"),
        {f"rocket/{i}.jpg": pathlib.Path(p).read_bytes() for i, p in enumerate(written["rocket"])},
    )
    model = create_model("squeezenet", num_classes=3, input_size=32)
    manifest = new_manifest(
        model, "squeezenet", ["cat", "rocket", HOSTILE_LABEL], "none", name="rev", version="2"
    )
    save_artifact(model, manifest, str(work / "model"))
    results = str(work / "results")
    classify.run(["--input", str(photos), "--model", str(work / "model"), "--output", results])
    return work, results


def test_the_report_loads_offline_and_every_thumbnail_renders(classified, capsys):
    work, results = classified
    output = str(work / "report")
    assert main(["review", "--results", results, "--output", output, "--per_label", "4", "--queue", "5"]) == 0
    printed = capsys.readouterr().out
    assert f"{output}/index.html" in printed
    seen = visit(f"{output}/index.html", screenshot=str(work / "review.png"))
    assert seen.console_errors == [] and seen.dialogs == [] and seen.scripts == 0
    thumbnails = [i for i in seen.images if i["src"].startswith("thumbnails/")]
    charts = [i for i in seen.images if i["src"] in (review.LABELS_CHART, review.SCORES_CHART)]
    assert len(charts) == 2 and len(thumbnails) + len(charts) == len(
        seen.images
    )  # no other <img>: none from data
    assert all(i["naturalWidth"] > 0 for i in seen.images), [i for i in seen.images if not i["naturalWidth"]]
    assert HOSTILE in seen.text  # a name is text, never markup
    rows = pd.concat(pd.read_parquet(p) for p in (work / "results").glob("results-*.parquet"))
    errors = pd.concat(pd.read_parquet(p) for p in (work / "results").glob("errors-*.parquet"))
    assert f"{len(rows)}\nclassified" in seen.text and f"{len(errors)}\nerrors" in seen.text
    assert "CorruptImage" in seen.text and str(work / "photos/copies/broken.jpg") in seen.text
    assert "Least certain: 5 lowest top-1 scores" in seen.text
    assert "3 copies" in seen.text  # the cat, its copy and the hostile-named copy
    assert any("more.tar.gz!/rocket/" in i["alt"] for i in thumbnails)  # archive members have thumbnails


def test_content_sections_follow_the_rows(classified):
    _, results = classified
    rows = reports.read_results(results, review.RESULT_COLUMNS)
    errors = reports.read_errors(results, review.ERROR_COLUMNS)
    content = review.review_content(rows, errors, per_label=2, queue=3)
    distinct = rows.sort_values(["score", "image_uri"]).drop_duplicates("sha256")
    assert [i["uri"] for i in content["queue"]] == list(distinct.image_uri[:3])
    assert sum(s["count"] for s in content["per_label"]) == len(rows)
    assert all(len(s["images"]) == min(2, s["count"]) for s in content["per_label"])
    (group,) = [g for g in content["duplicates"] if g["count"] == 3]
    assert {os.path.basename(u) for u in group["uris"]} == {"0000.jpg", "same-cat.jpg", HOSTILE}
    assert {(g["stage"], g["error_type"], g["count"]) for g in content["error_groups"]} == {
        ("decode", "CorruptImage", 1)
    }
    # The queue shows each image once: the cat and its two copies are one entry, naming the others.
    whole = review.review_content(rows, errors, per_label=2, queue=len(rows))["queue"]
    sha = dict(zip(rows.image_uri, rows.sha256, strict=True))
    assert len(whole) == rows.sha256.nunique() == len({sha[i["uri"]] for i in whole})
    (cat,) = [i for i in whole if sha[i["uri"]] == group["sha256"]]
    assert {cat["uri"], *cat["duplicates"]} == set(group["uris"]) and len(cat["duplicates"]) == 2
    again = review.review_content(rows, errors, per_label=2, queue=3)
    assert again["per_label"] == content["per_label"]  # the same sample every time


def test_hostile_labels_and_names_are_escaped_in_the_html(classified):
    _, results = classified
    rows = reports.read_results(results, review.RESULT_COLUMNS)
    rows.loc[0, "label"] = HOSTILE_LABEL
    errors = reports.read_errors(results, review.ERROR_COLUMNS)
    content = review.with_thumbnails(review.review_content(rows, errors, 3, 3), set())
    page = review.render(
        content, {"results": "<script>x()</script>", "model": None, "inputs": 1, "skipped": 0}
    )
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "<img src=x" not in page and "<script>x()" not in page
    assert "<script" not in page  # the page itself has no script at all


def test_thumbnails_come_from_gcs_and_archive_members(classified, gcs_bucket, tmp_path):
    work, _ = classified
    photos = work / "photos"
    storage.write_atomic(f"{gcs_bucket}/in/more.tar.gz", local_path=str(photos / "more.tar.gz"))
    storage.write_atomic(f"{gcs_bucket}/in/cat.jpg", local_path=str(photos / "copies" / "same-cat.jpg"))
    results = f"{gcs_bucket}/results"
    classify.run(["--input", f"{gcs_bucket}/in", "--model", str(work / "model"), "--output", results])
    output = f"{gcs_bucket}/report"
    review.run(["--results", results, "--output", output])
    page = storage.read_text(f"{output}/index.html")
    names = {
        m.path.rsplit("/", 1)[-1]
        for m in storage.FileSystems.match([f"{output}/thumbnails/*"])[0].metadata_list
    }
    expected = [
        f"{gcs_bucket}/in/cat.jpg",
        *(f"{gcs_bucket}/in/more.tar.gz!/rocket/{i}.jpg" for i in range(3)),
    ]
    assert {review.thumbnail_name(uri) for uri in expected} == names
    assert all(f"thumbnails/{name}" in page for name in names)


def test_an_existing_report_is_not_overwritten(classified, capsys):
    work, results = classified
    output = str(work / "report-twice")
    assert main(["review", "--results", results, "--output", output]) == 0
    assert main(["review", "--results", results, "--output", output]) == 2
    assert "already holds a review" in capsys.readouterr().err
    assert main(["review", "--results", results, "--output", output, "--overwrite"]) == 0


def test_a_multi_label_models_label_sets_show_on_the_page(multilabel, tmp_path, capsys):
    results = str(multilabel / "results")
    rows = pd.concat(pd.read_parquet(p) for p in (multilabel / "results").glob("results-*.parquet"))
    output = str(tmp_path / "report")
    assert (
        main(["review", "--results", results, "--output", output, "--per_label", "12", "--queue", "4"]) == 0
    )
    content = review.review_content(
        reports.read_results(results, review.RESULT_COLUMNS, (review.LABEL_SET_COLUMN,)),
        reports.read_errors(results, review.ERROR_COLUMNS),
        per_label=12,
        queue=4,
    )
    sets = {row.image_uri: list(row.labels) for row in rows.itertuples()}
    # By label: every class of the sets, an image under each of its labels (or under NO_LABEL).
    for sample in content["per_label"]:
        members = [u for u, labels in sets.items() if sample["label"] in (labels or [review.NO_LABEL])]
        assert sample["count"] == len(members) and {i["uri"] for i in sample["images"]} == set(members)
        assert all(i["labels"] == sets[i["uri"]] for i in sample["images"])
    assert sum(s["count"] for s in content["per_label"]) == sum(max(len(v), 1) for v in sets.values())
    seen = visit(f"{output}/index.html")
    assert seen.console_errors == [] and seen.scripts == 0
    assert all(i["naturalWidth"] > 0 for i in seen.images)
    several = next(labels for labels in sets.values() if len(labels) > 1)
    assert f"labels: {', '.join(several)}" in seen.text


def test_a_single_label_models_page_shows_no_label_sets(classified):
    _, results = classified
    rows = reports.read_results(results, review.RESULT_COLUMNS, (review.LABEL_SET_COLUMN,))
    content = review.review_content(rows, reports.read_errors(results, review.ERROR_COLUMNS), 2, 3)
    assert "labels" not in rows.columns and all(i["labels"] is None for i in content["queue"])
    page = review.render(
        review.with_thumbnails(content, set()), {"results": "r", "model": None, "inputs": 1, "skipped": 0}
    )
    assert "labels:" not in page
