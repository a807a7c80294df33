"""The labelling loop keeps its classes and its images, walked as a user does from relative paths.

In one folder: two archives of photo crops (5 a class, 6 classes; the same
cat photo in both), a loose photo, and the last round's model, which knows a
seventh class (hubble) that no image shows. ``classify shards`` -> ``review``
-> ``export-labels`` -> a Label Studio export shaped like the one a real
Label Studio 1.23.2 wrote (its default, annotated tasks only, and with
``download_all_tasks=true``) -> ``prepare --labels`` -> ``train``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

import pytest
from packing import pack
from photos import CLASSES, write_photo_classes

from beamvision.models import create_model
from beamvision.models.artifact import new_manifest, save_artifact
from beamvision.models.dataset import SPLITS
from beamvision.pipelines.cli import main

SHOWN = CLASSES[:6]  # hubble, the seventh, is a class of the model that no image shows
UNTOUCHED = 4  # tasks nobody annotates


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The user's folder after ``classify --input shards --model model-0 --output runs/1`` ran in it."""
    folder = tmp_path_factory.mktemp("round-trip")
    with contextlib.chdir(folder):
        written = write_photo_classes("photos", per_class=5, size=(48, 36))
        loose = write_photo_classes("more", per_class=1, size=(48, 36), seed=3)["astronaut"][0]

        def members(classes):
            return {f"{c}/{os.path.basename(p)}": _read(p) for c in classes for p in written[c]}

        os.makedirs("shards")
        pack("shards/part-1.tar", members(SHOWN[:3]))
        with open(written["cat"][0], "rb") as f:  # the same photo in the other archive too
            pack("shards/part-2.zip", {**members(SHOWN[3:]), "cat/copy-of-0000.jpg": f.read()})
        os.rename(loose, "shards/astronaut-loose.jpg")
        model = create_model("squeezenet", num_classes=len(CLASSES), input_size=32)
        manifest = new_manifest(model, "squeezenet", sorted(CLASSES), "none", name="round", version="1")
        save_artifact(model, manifest, "model-0")
        assert main(["classify", "--input", "shards", "--model", "model-0", "--output", "runs/1"]) == 0
    return folder


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _export(tasks_file: str, *flags: str) -> list[dict]:
    argv = ["export-labels", "--results", "runs/1", "--format", "labelstudio", "--output", tasks_file]
    assert main([*argv, "--local_files_root", ".", "--extract_to", "ls-files", *flags]) == 0
    with open(tasks_file) as f:
        return json.load(f)


def _truth(task: dict) -> str:
    uri = task["data"]["source_uri"]
    return uri.split("!/", 1)[1].split("/")[0] if "!/" in uri else "astronaut"  # the loose photo


def _label_studio_export(tasks: list[dict], all_tasks: bool) -> list[dict]:
    """What Label Studio 1.23.2's JSON export held after people labelled all but ``UNTOUCHED`` tasks.

    Its shape as seen: each task's imported ``data`` unchanged, ``annotations``
    (the result, who and when, the prediction it started from), ``predictions``
    as ids, ``meta``, counts. The default export (``exportType=JSON``) leaves
    out tasks nobody annotated; ``download_all_tasks=true`` keeps them, with
    ``annotations: []``.
    """
    exported = []
    for number, task in enumerate(tasks, 1):
        choice = {"choices": [_truth(task)]}
        result = [{"from_name": "choice", "to_name": "image", "type": "choices", "value": choice}]
        touched = number > UNTOUCHED
        annotations = [
            {
                "id": number,
                "completed_by": 1,
                "result": result,
                "was_cancelled": False,
                "ground_truth": False,
                "created_at": "2026-12-02T15:32:40.918560Z",
                "updated_at": "2026-12-02T15:32:40.918581Z",
                "lead_time": None,
                "prediction": {"id": number, **task["predictions"][0], "task": number, "project": 1},
                "result_count": 1,
                "task": number,
                "project": 1,
            }
        ]
        if touched or all_tasks:
            exported.append(
                {
                    "id": number,
                    "annotations": annotations if touched else [],
                    "drafts": [],
                    "predictions": [number],
                    "data": task["data"],
                    "meta": {},
                    "inner_id": number,
                    "total_annotations": int(touched),
                    "cancelled_annotations": 0,
                    "total_predictions": 1,
                    "project": 1,
                }
            )
    return exported


def test_duplicates_are_queued_and_exported_once(work, monkeypatch):
    monkeypatch.chdir(work)
    assert main(["review", "--results", "runs/1", "--output", "review", "--queue", "40"]) == 0
    page = open("review/index.html").read()  # noqa: SIM115
    queue = page[page.index('id="queue"') : page.index('id="labels"')]
    copies = ("shards/part-1.tar!/cat/0000.jpg", "shards/part-2.zip!/cat/copy-of-0000.jpg")
    # One thumbnail for the one photo (rows name files canonically: absolute).
    assert sum(queue.count(f'alt="{os.path.join(str(work), uri)}"') for uri in copies) == 1
    assert "the same bytes also at" in queue

    tasks = _export("queue.json", "--queue", "40")
    assert len(tasks) == 31  # 30 members and the loose photo, less one copy
    shown = [t["data"]["source_uri"] for t in tasks]
    (twice,) = [t for t in tasks if t["data"]["duplicates"]]
    both = {twice["data"]["source_uri"], *twice["data"]["duplicates"]}
    assert both == {os.path.join(str(work), uri) for uri in copies} and len(set(shown) & both) == 1


def test_export_refuses_a_path_outside_the_root_before_extracting(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    argv = ["export-labels", "--results", "runs/1", "--format", "labelstudio", "--output", "refused.json"]
    assert main([*argv, "--local_files_root", "ls-root", "--extract_to", "ls-root/members"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "astronaut-loose.jpg is not under it" in err
    assert not os.path.exists("ls-root") and not os.path.exists("refused.json")  # nothing extracted


@pytest.mark.slow
def test_a_reviewed_round_keeps_every_class_and_splits_each_one(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    tasks = _export("tasks.json")
    assert all(t["data"]["classes"] == sorted(CLASSES) for t in tasks)
    config = open("tasks.label-config.xml").read()  # noqa: SIM115
    assert re.findall(r'<Choice value="([^"]+)"/>', config) == sorted(CLASSES)  # hubble too
    capsys.readouterr()

    for all_tasks in (False, True):
        name = "all" if all_tasks else "default"
        with open(f"export-{name}.json", "w") as f:
            json.dump(_label_studio_export(tasks, all_tasks), f)
        argv = ["prepare", "--input", "shards", "--labels", f"export-{name}.json", "--output", f"data-{name}"]
        assert main([*argv, "--image_size", "32"]) == 0
        printed = capsys.readouterr()
        assert (
            f"{len(tasks) - UNTOUCHED} annotated tasks, {UNTOUCHED if all_tasks else 0} without a choice "
            f"annotation (skipped); {len(CLASSES)} classes recorded" in printed.out
        )
        assert "1 class has no usable image: hubble" in printed.err
        labels = json.load(open(f"data-{name}/labels.json"))  # noqa: SIM115
        stats = json.load(open(f"data-{name}/stats.json"))  # noqa: SIM115
        assert labels == sorted(CLASSES) and stats["errors"] == 0
        assert stats["examples"] == len(tasks) - UNTOUCHED
        for label in SHOWN:  # every class reviewed with 3 images or more is in every split
            reviewed = sum(stats["counts"][split][label] for split in SPLITS)
            assert reviewed < 3 or all(stats["counts"][split][label] for split in SPLITS), stats["counts"]
        missing = {split: names for split, names in stats["missing_from_splits"].items() if names}
        assert all(f"no {split} image: {', '.join(n)}" in printed.err for split, n in missing.items())

    argv = ["train", "--data", "data-all", "--architecture", "squeezenet", "--output", "model-1"]
    assert main([*argv, "--epochs", "1", "--steps_per_epoch", "1"]) == 0
    manifest = json.load(open("model-1/manifest.json"))  # noqa: SIM115
    assert manifest["labels"] == sorted(CLASSES)  # the next round's model has every class


def test_prepare_keeps_the_classes_of_a_classes_file(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    with open("classes.txt", "w") as f:  # photos/ has a folder of each of CLASSES, and no zebra
        f.write("".join(f"{name}\n" for name in (*CLASSES, "zebra")))
    argv = ["prepare", "--input", "photos", "--output", "data-folders", "--image_size", "16"]
    assert main([*argv, "--classes", "classes.txt"]) == 0
    assert "1 class has no usable image: zebra" in capsys.readouterr().err
    assert json.load(open("data-folders/labels.json")) == sorted([*CLASSES, "zebra"])  # noqa: SIM115
    assert main([*argv, "--overwrite", "--classes", "model-0/manifest.json"]) == 2
    assert "--classes model-0/manifest.json: not a JSON list of class names" in capsys.readouterr().err
