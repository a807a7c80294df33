"""The Label Studio format, both directions: the tasks export-labels writes, the export prepare reads.

export-labels writes import-ready tasks in Label Studio's documented format
(``label_studio_tasks``): ``data.image`` (what the tool can open: a storage
URI as it is, a local file as a local-files URL, ``image_url``), the image's
own URI as ``data.source_uri``, and one prediction per task (a ``choices``
result with ``from_name``/``to_name``, ``score`` and ``model_version``; a
multi-label model's label set as its choices, with a config of
``choice="multiple"``).
prepare reads a JSON export of the reviewed tasks back (``label_studio_labels``):
a person's choices are the image's labels (one, or a label set for
``prepare --multi_label``), found by ``source_uri`` or ``image``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import urllib.parse

from apache_beam.io.filesystems import FileSystems

from beamvision import storage
from beamvision.pipelines.flags import UsageError
from beamvision.transforms.read import listed_uri

LOCAL_FILES_URL = "/data/local-files/?d="  # Label Studio's URL of a file under its document root


# --- what export-labels writes ------------------------------------------------------------------


def image_url(uri: str, local_files_root: str | None) -> str:
    """What Label Studio can open: a storage URI as it is, a local file as a local-files URL."""
    if FileSystems.get_scheme(uri) is not None:
        return uri
    if local_files_root is None:
        raise UsageError(
            f"--local_files_root: needed for local images such as {uri} "
            "(Label Studio serves local files only under its document root)"
        )
    root = os.path.abspath(local_files_root)
    path = os.path.abspath(uri)
    if os.path.commonpath([root, path]) != root:
        raise UsageError(f"--local_files_root {local_files_root}: {uri} is not under it")
    return LOCAL_FILES_URL + urllib.parse.quote(os.path.relpath(path, root))


def label_config(classes: list[str], from_name: str, to_name: str, multiple: bool = False) -> str:
    """A Label Studio labelling config for the tasks: the image and one choice per class, every class.

    ``multiple``: a multi-label model's tasks, where a person ticks every class the image shows.
    """
    from xml.sax.saxutils import quoteattr

    choices = "".join(f"    <Choice value={quoteattr(name)}/>\n" for name in classes)
    kind = "multiple" if multiple else "single"
    return (
        "<View>\n"
        f'  <Image name={quoteattr(to_name)} value="$image"/>\n'
        f"  <Choices name={quoteattr(from_name)} toName={quoteattr(to_name)} choice={quoteattr(kind)} "
        'showInLine="true">\n'
        f"{choices}"
        "  </Choices>\n"
        "</View>\n"
    )


def label_studio_tasks(
    rows,
    from_name: str,
    to_name: str,
    local_files_root: str | None,
    placed: dict[str, str] | None = None,
    classes: list[str] | None = None,
) -> list[dict]:
    """One task per result row, with the model's top-1 label as a prediction.

    Rows of a multi-label model (a ``labels`` column) predict their label
    set: the prediction's ``choices`` is the row's ``labels`` (no result when
    it is empty), and ``score`` is still the top-1 score.

    ``placed``: where archive members were extracted (``extract_members``);
    the task shows that file and keeps the member's URI as ``source_uri``
    (a local one made absolute: classify's relative URIs are relative to
    the folder it ran in, and prepare may run elsewhere).
    ``duplicates``: the URIs of the same bytes elsewhere (rows from
    ``distinct_least_certain``), which the one task stands for. ``classes``:
    the model's class list, kept in every task's data (``data.classes``) so
    that a class nobody chose still reaches prepare from any export.
    """
    placed = placed or {}
    return [
        {
            "data": {
                "image": image_url(placed.get(row.image_uri, row.image_uri), local_files_root),
                "source_uri": storage.canonical(row.image_uri),
                "duplicates": [storage.canonical(uri) for uri in getattr(row, "duplicates", [])],
                **({"classes": list(classes)} if classes else {}),
            },
            "predictions": [
                {
                    "model_version": f"{row.model_name}-{row.model_version}",
                    "score": float(row.score),
                    "result": [
                        {
                            "from_name": from_name,
                            "to_name": to_name,
                            "type": "choices",
                            "value": {"choices": chosen},
                        }
                        for chosen in [_predicted_choices(row)]
                        if chosen
                    ],
                }
            ],
        }
        for row in rows.itertuples()
    ]


def _predicted_choices(row) -> list[str]:
    """The choices a row predicts: its label set (a multi-label model's), else its top-1 label."""
    labels = getattr(row, "labels", None)
    return [row.label] if labels is None else [str(label) for label in labels]


# --- what prepare reads -------------------------------------------------------------------------


def is_label_studio_export(uri: str) -> bool:
    """Whether ``--labels`` names a Label Studio JSON export (by its name) rather than a CSV."""
    return uri.lower().endswith(".json")


@dataclasses.dataclass(frozen=True)
class Reviewed:
    """What prepare takes from a Label Studio export: the labels, the tasks without one, the classes."""

    labelled: list[tuple[str, tuple[str, ...]]]  # (uri, its choices) per annotated task
    unannotated: int  # tasks in the export without a choice annotation
    classes: list[str]  # every class the tasks record (data.classes), chosen or not


def label_studio_labels(text: str, root: str) -> Reviewed:
    """(uri, choices) per annotated task of a Label Studio JSON export, how many had none, the classes.

    The labels are the choices of the task's latest annotation that was not
    cancelled (several where the labelling config lets a person pick several:
    a label set, which prepare takes under ``--multi_label`` and otherwise
    refuses as conflicting labels): a person's labels override the model's
    prediction, and a task nobody annotated is skipped (and counted). The image is the task's
    ``source_uri`` (which ``export-labels`` sets: a file, a ``gs://`` object
    or an archive member) or else its ``image``: a storage URI, or a
    local-files URL, whose path is taken relative to ROOT. URIs come back
    ``storage.canonical``: a relative ``source_uri`` is from the current
    directory, as it was typed, never joined onto ROOT again. The classes
    are those the tasks record (``data.classes``, which export-labels writes:
    the model's whole class list), so that a class nobody chose is still a class.

    Raises:
        UsageError: the text is not a Label Studio JSON export.
    """
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--labels: not JSON ({exc})") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and "data" in t for t in tasks):
        raise UsageError(
            "--labels: not a Label Studio JSON export (a list of tasks with data and annotations; "
            "export with the JSON format, not JSON_MIN)"
        )
    labelled, unannotated, classes = [], 0, set()
    for number, task in enumerate(tasks, 1):
        try:
            chosen = _annotated_choices(task.get("annotations") or [])
            uri = _task_uri(task["data"], root)
            recorded = task["data"].get("classes") or []
            if not isinstance(recorded, list):
                raise ValueError("data.classes is not a list")
        except (AttributeError, TypeError, ValueError) as exc:
            raise UsageError(f"--labels: task {number} is not a Label Studio task ({exc})") from None
        classes.update(str(name) for name in recorded)
        if not chosen or uri is None:
            unannotated += 1
        else:
            labelled.append((uri, chosen))
    return Reviewed(labelled, unannotated, sorted(classes))


def _annotated_choices(annotations: list[dict]) -> tuple[str, ...]:
    """The distinct choices of the latest annotation not cancelled that has any, in order; () if none."""
    kept = [a for a in annotations if not a.get("was_cancelled")]
    for annotation in sorted(kept, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0), reverse=True):
        chosen = [
            str(choice)
            for result in annotation.get("result") or []
            if result.get("type") == "choices"
            for choice in (result.get("value") or {}).get("choices") or []
        ]
        if chosen:
            return tuple(dict.fromkeys(chosen))
    return ()


def _task_uri(data: dict, root: str) -> str | None:
    uri = data.get("source_uri") or data.get("image")
    if not isinstance(uri, str) or not uri:
        return None
    if uri.startswith(LOCAL_FILES_URL):  # a path under Label Studio's document root: here, under ROOT
        uri = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query).get("d", [""])[0]
        uri = storage.join(root, uri) if uri and not os.path.isabs(uri) else uri
    named = listed_uri(uri)  # canonical; a relative path is from the current directory, as typed
    return named[0] if named else None
