"""``beamvision export-labels``: classify results as labelling-tool input.

    beamvision export-labels --results gs://bucket/runs/1 --format labelstudio --output tasks.json --queue 500
    beamvision export-labels --results out/ --format csv --output labels.csv

``labelstudio`` writes import-ready tasks in Label Studio's documented format:
``data.image`` and one prediction per task (a ``choices`` result with
``from_name``/``to_name``, ``score`` and ``model_version``). Images must be
viewable by the tool: ``gs://`` URIs stay as they are (a cloud storage
source); local files become Label Studio local-files URLs under
``--local_files_root``. ``csv`` writes ``uri,label,score`` for CVAT,
FiftyOne or a spreadsheet. ``--queue N`` keeps the N least certain images.
"""

from __future__ import annotations

import csv
import io
import json
import os
import urllib.parse

from apache_beam.io.filesystems import FileSystems

from beamvision import storage
from beamvision.pipelines import options
from beamvision.pipelines.evaluate import read_results

COLUMNS = ["image_uri", "label", "score", "model_name", "model_version"]


def image_url(uri: str, local_files_root: str | None) -> str:
    """What Label Studio can open: a storage URI as it is, a local file as a local-files URL."""
    if FileSystems.get_scheme(uri) is not None:
        return uri
    if local_files_root is None:
        raise options.UsageError(
            f"--local_files_root: needed for local images such as {uri} "
            "(Label Studio serves local files only under its document root)"
        )
    root = os.path.abspath(local_files_root)
    path = os.path.abspath(uri)
    if os.path.commonpath([root, path]) != root:
        raise options.UsageError(f"--local_files_root {local_files_root}: {uri} is not under it")
    return "/data/local-files/?d=" + urllib.parse.quote(os.path.relpath(path, root))


def label_studio_tasks(rows, from_name: str, to_name: str, local_files_root: str | None) -> list[dict]:
    """One task per result row, with the model's top-1 label as a prediction."""
    return [
        {
            "data": {"image": image_url(row.image_uri, local_files_root), "source_uri": row.image_uri},
            "predictions": [
                {
                    "model_version": f"{row.model_name}-{row.model_version}",
                    "score": float(row.score),
                    "result": [
                        {
                            "from_name": from_name,
                            "to_name": to_name,
                            "type": "choices",
                            "value": {"choices": [row.label]},
                        }
                    ],
                }
            ],
        }
        for row in rows.itertuples()
    ]


def run(argv: list[str] | None = None) -> int:
    """Writes the export; prints how many images it holds and where it went."""
    args = options.parse(
        "beamvision export-labels", __doc__.splitlines()[0], options.add_export_labels_arguments, argv
    )
    rows = read_results(args.results, COLUMNS).sort_values(["score", "image_uri"], kind="stable")
    if args.queue:
        rows = rows.head(args.queue)  # lowest top-1 scores first
    if args.format == "labelstudio":
        tasks = label_studio_tasks(rows, args.from_name, args.to_name, args.local_files_root)
        payload = json.dumps(tasks, indent=1).encode("utf-8")
    else:
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["uri", "label", "score"])
        writer.writerows((r.image_uri, r.label, f"{r.score:.6f}") for r in rows.itertuples())
        payload = text.getvalue().encode("utf-8")
    storage.write_atomic(args.output, payload)
    what = f"the {len(rows):,} least certain" if args.queue else f"{len(rows):,}"
    print(f"exported {what} images as {args.format} to {args.output}")
    return len(rows)
