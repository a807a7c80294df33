"""``beamvision export-labels``: classify results as labelling-tool input.

    beamvision export-labels --results gs://bucket/runs/1 --format labelstudio --output tasks.json --queue 500
    beamvision export-labels --results out/ --format csv --output labels.csv

``labelstudio`` writes import-ready tasks in Label Studio's documented format
(``beamvision.pipelines.labelstudio``: ``data.image`` and one prediction per
task, a ``choices`` result with ``from_name``/``to_name``, ``score`` and
``model_version``). Images must be
viewable by the tool: ``gs://`` URIs stay as they are (a cloud storage
source); local files become Label Studio local-files URLs under
``--local_files_root``; archive members are extracted to ``--extract_to``
(a labelling tool cannot open a member) and shown from there, keeping the
member's URI as ``source_uri`` so reviewed labels map back to it
(``prepare --labels``). ``csv`` writes ``uri,label,score,file,duplicates``
(``file``: where the image can be opened; ``duplicates``: a JSON list of the
other copies' URIs; for a multi-label model's results also ``labels``, a
JSON list: the label set) for CVAT, FiftyOne or a spreadsheet. A
multi-label model's tasks predict each image's label set (its ``labels``),
and the labelling config lets a person tick several classes
(``choice="multiple"``).
``--queue N`` keeps the N least certain images. Exact duplicates (the same
SHA-256) are exported once, the task listing the other URIs as
``duplicates``; every path is checked before any member is extracted.
Every task records the model's class list (``data.classes``, from the
classify summary) and a labelling config listing every class is written
beside the tasks (``tasks.label-config.xml``), so a class nobody chooses
survives the round trip to ``prepare --labels``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import sys

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beamvision import storage
from beamvision.console import counted
from beamvision.models.artifact import artifact_exists, load_manifest
from beamvision.pipelines.flags import UsageError, add_results_argument, parse, positive_int
from beamvision.pipelines.labelstudio import image_url, label_config, label_studio_tasks
from beamvision.pipelines.reports import distinct_least_certain, read_results, read_summary
from beamvision.transforms.members import (
    ArchiveBroken,
    archive_kind,
    iter_members,
    member_uri,
    safe_member_name,
    split_member_uri,
)
from beamvision.transforms.rows import LABELS_FIELD

COLUMNS = ["image_uri", "label", "score", "model_name", "model_version", "sha256"]
LABEL_SET_COLUMN = LABELS_FIELD.name  # a multi-label model's results: each image's label set
EXPORT_FORMATS = ("labelstudio", "csv")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_results_argument(parser)
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="labelstudio or csv")
    parser.add_argument("--output", required=True, metavar="FILE", help="the file to write, local or URI")
    parser.add_argument(
        "--queue",
        type=positive_int,
        metavar="N",
        help="only the N images the model is least sure of (lowest top-1 score)",
    )
    parser.add_argument(
        "--from_name", default="choice", metavar="NAME", help="Label Studio Choices tag name (default choice)"
    )
    parser.add_argument(
        "--to_name", default="image", metavar="NAME", help="Label Studio Image tag name (default image)"
    )
    parser.add_argument(
        "--local_files_root",
        metavar="DIR",
        help="Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: local images under it become "
        "/data/local-files/?d=... URLs (without it, local paths are refused for labelstudio)",
    )
    parser.add_argument(
        "--extract_to",
        metavar="DIR",
        help="where archive members are extracted for the tool to open (local, under "
        "--local_files_root, or gs://); needed for members with labelstudio",
    )


@dataclasses.dataclass(frozen=True)
class Config:
    results: str
    format: str
    output: str
    queue: int | None
    from_name: str
    to_name: str
    local_files_root: str | None
    extract_to: str | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def extract_members(uris, extract_to: str, digests: dict[str, str] | None = None) -> dict[str, str]:
    """Writes the archive members among ``uris`` under ``extract_to``; returns member URI -> file written.

    ``digests``: member URI -> the SHA-256 classify saw; a member whose bytes
    differ now (the archive was replaced) is left out, with a warning, so the
    labeller never sees an image other than the one the model scored.

    Each archive is read once, streamed, for just its members named. A member
    goes to ``EXTRACT_TO/<archive name>-<digest of its URI>/<member path>``:
    member paths are normalised and checked (``safe_member_name``) and the
    target must lie under EXTRACT_TO, so no name can place a file elsewhere.
    Members an archive no longer holds (or holds past damage) are left out.
    """
    wanted: dict[str, set[str]] = collections.defaultdict(set)
    for uri in uris:
        parts = split_member_uri(uri)
        if parts and safe_member_name(parts[1]) == parts[1]:
            wanted[parts[0]].add(parts[1])
    placed = {}
    digests = digests or {}
    for archive, names in sorted(wanted.items()):
        folder = storage.join(extract_to, _archive_folder(archive))
        try:
            with FileSystems.open(archive, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                for member in iter_members(f, archive_kind(archive), wanted=names):
                    uri = member_uri(archive, member.name)
                    if member.data is None:
                        continue
                    if uri in digests and hashlib.sha256(member.data).hexdigest() != digests[uri]:
                        print(f"WARNING: {uri}: its bytes changed since it was classified", file=sys.stderr)
                        continue
                    target = storage.join(folder, *member.name.split("/"))
                    _check_under(target, extract_to)
                    try:
                        storage.write_atomic(target, member.data)
                    except Exception as exc:  # a storage failure leaves this member out, not the rest
                        print(f"WARNING: {target}: cannot write: {exc}", file=sys.stderr)
                        continue
                    placed[uri] = target
        except (ArchiveBroken, OSError) as exc:
            print(f"WARNING: {archive}: {exc}", file=sys.stderr)
    return placed


def _archive_folder(archive: str) -> str:
    """A folder name for an archive's members: its file name (made plain) and a digest of its URI."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", archive.rstrip("/").rsplit("/", 1)[-1])
    return f"{name}-{hashlib.sha256(archive.encode('utf-8')).hexdigest()[:8]}"


def _check_under(target: str, root: str) -> None:
    if FileSystems.get_scheme(root) is None:
        root, target = os.path.abspath(root), os.path.abspath(target)
        if os.path.commonpath([root, target]) != root:
            raise ValueError(f"{target} is not under {root}")


def run(argv: list[str] | None = None) -> int:
    """Writes the export; prints how many images it holds and where it went."""
    config = Config.from_args(parse("beamvision export-labels", __doc__.splitlines()[0], add_arguments, argv))
    rows = distinct_least_certain(read_results(config.results, COLUMNS, (LABEL_SET_COLUMN,)))  # each once
    multi_label = LABEL_SET_COLUMN in rows.columns
    if config.queue:
        rows = rows.head(config.queue)  # lowest top-1 scores first
    if config.format == "labelstudio":
        _check_servable(rows, config)  # every path, before anything is extracted
    rows, placed = _place_members(rows, config)
    if config.format == "labelstudio":
        classes = _model_classes(config.results, rows)
        tasks = label_studio_tasks(
            rows, config.from_name, config.to_name, config.local_files_root, placed, classes
        )
        payload = json.dumps(tasks, indent=1).encode("utf-8")
        config_file = label_config_file(config.output)
        storage.write_atomic(
            config_file, label_config(classes, config.from_name, config.to_name, multi_label).encode()
        )
        print(
            f"labelling config with all {len(classes):,} classes: {config_file} "
            "(the project's labeling interface)"
        )
    else:
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["uri", "label", "score", "file", "duplicates", *([LABEL_SET_COLUMN] * multi_label)])
        writer.writerows(
            (
                r.image_uri,
                r.label,
                f"{r.score:.6f}",
                placed.get(r.image_uri, r.image_uri),
                json.dumps(list(r.duplicates)) if len(r.duplicates) else "",
                *([json.dumps(list(r.labels))] if multi_label else []),
            )
            for r in rows.itertuples()
        )
        payload = text.getvalue().encode("utf-8")
    storage.write_atomic(config.output, payload)
    images = counted(len(rows), "image")
    what = f"the {images.replace(' image', ' least certain image')}" if config.queue else images
    print(f"exported {what} as {config.format} to {config.output}")
    return len(rows)


def label_config_file(output: str) -> str:
    """Where the labelling config goes: beside the tasks, ``tasks.json`` -> ``tasks.label-config.xml``."""
    return re.sub(r"\.json$", "", output) + ".label-config.xml"


def _model_classes(results: str, rows) -> list[str]:
    """The class list of the model that made the results: its summary's record, else its manifest.

    Without either (results of an older beamvision, or a glob of runs), the
    labels the rows hold, with a warning: classes no image was given are
    then missing, and ``prepare --classes`` must bring them back.
    """
    model = read_summary(results).get("model", {})
    if model.get("labels"):
        return list(model["labels"])
    if model.get("uri") and artifact_exists(model["uri"]):
        return list(load_manifest(model["uri"]).labels)
    found = sorted(set(rows.label))
    print(
        f"WARNING: --results {results}: the model's class list is not recorded; the tasks list only the "
        f"{len(found):,} classes predicted (give prepare --classes FILE for the others)",
        file=sys.stderr,
    )
    return found


def _check_servable(rows, config: Config) -> None:
    """Refuses, before anything is written, an image that Label Studio could not be shown.

    Files must lie under ``--local_files_root`` (``image_url``); archive
    members need ``--extract_to``, itself under it unless on ``gs://``.
    """
    members = rows.image_uri.map(lambda uri: split_member_uri(uri) is not None)
    for uri in rows.image_uri[~members]:
        image_url(uri, config.local_files_root)
    if members.any() and config.extract_to and FileSystems.get_scheme(config.extract_to) is None:
        image_url(os.path.join(config.extract_to, "member"), config.local_files_root)


def _place_members(rows, config: Config):
    """Extracts the archive members among ``rows`` (``--extract_to``); the rows kept, and where each went.

    Members that could not be extracted are left out, with a warning.
    """
    members = [uri for uri in rows.image_uri if split_member_uri(uri)]
    placed = {}
    if members and config.extract_to:
        digests = dict(zip(rows.image_uri, rows.sha256, strict=True))
        placed = extract_members(members, config.extract_to, digests)
        print(f"extracted {counted(len(placed), 'archive member')} to {config.extract_to}")
    elif members and config.format == "labelstudio":
        raise UsageError(
            f"--extract_to: needed for archive members such as {members[0]} "
            "(a labelling tool cannot open a member inside an archive)"
        )
    if placed or config.extract_to:
        missing = rows.image_uri.isin(members) & ~rows.image_uri.isin(placed)
        if missing.any():
            print(
                f"WARNING: {int(missing.sum()):,} archive members could not be extracted and are left out, "
                f"such as {rows.image_uri[missing].iloc[0]}",
                file=sys.stderr,
            )
            rows = rows[~missing]
            if rows.empty:
                raise UsageError(
                    f"--extract_to {config.extract_to}: no archive member could be extracted "
                    "(see the warnings; relative URIs are read from the current folder)"
                )
    return rows, placed
