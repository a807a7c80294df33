"""``beamvision review``: a classify output as a static HTML report, for people to look at.

    beamvision review --results gs://bucket/runs/1 --output gs://bucket/reviews/1 [--queue 48]

OUTPUT/index.html shows the totals, errors by stage and type (a sample URI
each), the label distribution and the score histogram (PNG), the queue of the
``--queue`` least certain images, a sample of ``--per_label`` thumbnails per
label and the groups of exact duplicates (equal SHA-256 of the bytes read).
A multi-label model's results (a ``labels`` column) show each image's label
set under it, and "By label" samples every class of the sets (an image under
each of its labels; those with an empty set under ``NO_LABEL``).
Thumbnails are made by a Beam pipeline (``MakeThumbnails``: files, archive
members and ``gs://`` alike; Beam options pass through) and stored under
OUTPUT/thumbnails/, named by a digest of the URI.

The page works offline, opened from disk or served from a bucket: no script
at all, no CDN, every picture beside it. File names and labels come from
outside: they are escaped (Jinja2 autoescaping), and the page's Content
Security Policy forbids scripts, so nothing in the data can run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.resources
import io

from apache_beam.io.filesystems import FileSystems
from apache_beam.runners.runner import PipelineResult

from beamvision import exits, storage
from beamvision.console import counted
from beamvision.pipelines.flags import add_results_argument, add_switch, parse_pipeline_args, positive_int
from beamvision.pipelines.launch import build_only, claim_output, discard_unfinished, is_dry_run, run_to_end
from beamvision.pipelines.reports import distinct_least_certain, read_errors, read_results, read_summary
from beamvision.transforms.rows import LABELS_FIELD
from beamvision.transforms.runners import new_pipeline
from beamvision.transforms.thumbnails import thumbnail_name

PAGE = "index.html"
THUMBNAILS = "thumbnails"
LABELS_CHART = "labels.png"
SCORES_CHART = "scores.png"
OUTPUTS = [PAGE, LABELS_CHART, SCORES_CHART, f"{THUMBNAILS}/*"]
RESULT_COLUMNS = ["image_uri", "label", "score", "width", "height", "sha256", "model_name", "model_version"]
ERROR_COLUMNS = ["image_uri", "stage", "error_type", "message", "sha256"]
DUPLICATE_GROUPS_SHOWN = 50
URIS_SHOWN_PER_GROUP = 20
LABELS_CHARTED = 30
LABEL_SET_COLUMN = LABELS_FIELD.name  # a multi-label model's results: each image's label set
NO_LABEL = "(no label at its threshold)"  # By label: a multi-label model's images with an empty set


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_results_argument(parser)
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="where index.html and its pictures go, local or URI"
    )
    parser.add_argument(
        "--per_label",
        type=positive_int,
        default=12,
        metavar="N",
        help="thumbnails shown per label (default 12)",
    )
    parser.add_argument(
        "--queue",
        type=positive_int,
        default=48,
        metavar="N",
        help="the N least certain images (lowest top-1 score) to review first (default 48)",
    )
    parser.add_argument(
        "--thumbnail_size", type=positive_int, default=160, metavar="PX", help="longer side (default 160)"
    )
    add_switch(parser, "--overwrite", "replace an earlier report in --output")


@dataclasses.dataclass(frozen=True)
class Config:
    results: str
    output: str
    per_label: int
    queue: int
    thumbnail_size: int
    overwrite: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _spread(uri: str) -> str:
    """A sort key that samples a label's images evenly and the same way every time."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()


def review_content(results, errors, per_label: int, queue: int) -> dict:
    """What the page shows, from result and error rows (pandas); thumbnails are filled in later.

    Images are dicts of ``uri``, ``label``, ``score``, ``labels`` (the label
    set of a multi-label model's row, else None) and ``thumbnail`` (set by
    ``with_thumbnails``); the queue's also of ``duplicates``, the URIs of the
    same bytes elsewhere, shown once (``distinct_least_certain``).
    """
    multi_label = LABEL_SET_COLUMN in results.columns

    def image(row) -> dict:
        labels = [str(x) for x in row.labels] if multi_label else None
        return {"uri": row.image_uri, "label": row.label, "score": float(row.score), "labels": labels}

    def queued(row) -> dict:
        return {**image(row), "duplicates": list(row.duplicates)}

    grouped = _by_label(results, multi_label)
    counts = grouped.group.value_counts()
    label_order = sorted(counts.index, key=lambda label: (-counts[label], label))
    samples = []
    for label in label_order:
        rows = grouped[grouped.group == label]
        picked = sorted(rows.itertuples(), key=lambda r: _spread(r.image_uri))[:per_label]
        samples.append({"label": label, "count": int(counts[label]), "images": [image(r) for r in picked]})
    least_certain = distinct_least_certain(results).head(queue)  # each image once
    error_groups = []
    for (stage, error_type), rows in errors.groupby(["stage", "error_type"], sort=True):
        first = rows.sort_values("image_uri").iloc[0]
        error_groups.append(
            {
                "stage": stage,
                "error_type": error_type,
                "count": len(rows),
                "sample_uri": first.image_uri,
                "sample_message": first.message,
            }
        )
    error_groups.sort(key=lambda g: (-g["count"], g["stage"], g["error_type"]))
    return {
        "totals": {
            "results": len(results),
            "errors": len(errors),
            "labels": len(set(counts.index) - {NO_LABEL}),
        },
        "error_groups": error_groups,
        "queue": [queued(r) for r in least_certain.itertuples()],
        "per_label": samples,
        "duplicates": duplicate_groups(results, errors),
    }


def _by_label(results, multi_label: bool):
    """The rows with a ``group`` column, the label they are sampled under: the top-1 label, or for a
    multi-label model one row per label of the set (``NO_LABEL`` for an empty set)."""
    if not multi_label:
        return results.assign(group=results.label)
    groups = results[LABEL_SET_COLUMN].map(lambda labels: [str(x) for x in labels] or [NO_LABEL])
    return results.assign(group=groups).explode("group", ignore_index=True)


def duplicate_groups(results, errors) -> list[dict]:
    """Groups of two or more inputs with equal bytes (SHA-256), largest first, with their URIs."""
    import pandas as pd

    rows = pd.concat([results[["image_uri", "sha256"]], errors[["image_uri", "sha256"]]]).dropna()
    labels = dict(zip(results.image_uri, results.label, strict=True))
    groups = []
    for sha256, group in rows.groupby("sha256"):
        uris = sorted(set(group.image_uri))
        if len(uris) > 1:
            groups.append(
                {"sha256": sha256, "count": len(uris), "uris": uris, "labels": _labels_of(uris, labels)}
            )
    groups.sort(key=lambda g: (-g["count"], g["uris"][0]))
    for group in groups[:DUPLICATE_GROUPS_SHOWN]:
        group["shown"] = group["uris"][:URIS_SHOWN_PER_GROUP]
        group["image"] = {"uri": group["uris"][0], "label": None, "score": None, "labels": None}
    return groups


def _labels_of(uris: list[str], labels: dict[str, str]) -> list[str]:
    return sorted({labels[uri] for uri in uris if uri in labels})


def images_of(content: dict) -> list[dict]:
    """Every image the page shows (each needs a thumbnail)."""
    shown = list(content["queue"])
    for sample in content["per_label"]:
        shown += sample["images"]
    shown += [group["image"] for group in content["duplicates"][:DUPLICATE_GROUPS_SHOWN]]
    return shown


def with_thumbnails(content: dict, made: set[str]) -> dict:
    """Sets each image's ``thumbnail`` (a path relative to the page) where one was made."""
    for image in images_of(content):
        image["thumbnail"] = f"{THUMBNAILS}/{thumbnail_name(image['uri'])}" if image["uri"] in made else None
    return content


def render(content: dict, heading: dict) -> str:
    """The page: the template, autoescaped (names and labels are text, never markup)."""
    import jinja2

    source = (
        importlib.resources.files("beamvision.pipelines").joinpath("templates", "review.html").read_text()
    )
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(source).render(
        **content,
        heading=heading,
        labels_chart=LABELS_CHART,
        scores_chart=SCORES_CHART,
        duplicate_groups_shown=DUPLICATE_GROUPS_SHOWN,
    )


def charts(results) -> dict[str, bytes]:
    """The label distribution and the score histogram, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = results.label.value_counts().head(LABELS_CHARTED).iloc[::-1]
    pictures = {}
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(counts) + 1.2))
    ax.barh([str(label) for label in counts.index], counts.values, color="#3b6ea5")
    ax.set_xlabel("images")
    ax.set_title(f"Top-1 labels ({min(len(counts), LABELS_CHARTED)} most frequent)")
    pictures[LABELS_CHART] = _png(fig)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(results.score.astype(float), bins=20, range=(0.0, 1.0), color="#3b6ea5")
    ax.set_xlabel("top-1 score")
    ax.set_ylabel("images")
    ax.set_title("Score histogram")
    pictures[SCORES_CHART] = _png(fig)
    plt.close("all")
    return pictures


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _thumbnails_made(output: str) -> set[str]:
    pattern = storage.join(output, THUMBNAILS, "*.jpg")
    return {m.path.rsplit("/", 1)[-1] for m in FileSystems.match([pattern])[0].metadata_list}


def run(argv: list[str] | None = None) -> PipelineResult | None:
    """Builds the report: thumbnails (Beam), charts and the page; prints where it is."""
    import apache_beam as beam

    from beamvision.transforms.thumbnails import MakeThumbnails

    args, pipeline_options = parse_pipeline_args(
        "beamvision review", __doc__.splitlines()[0], add_arguments, argv
    )
    config = Config.from_args(args)
    results = read_results(config.results, RESULT_COLUMNS, (LABEL_SET_COLUMN,))
    errors = read_errors(config.results, ERROR_COLUMNS)
    content = review_content(results, errors, config.per_label, config.queue)
    uris = sorted({image["uri"] for image in images_of(content)})
    pipeline = new_pipeline(pipeline_options)
    _ = (
        pipeline
        | "ShownImages" >> beam.Create(uris)
        | "MakeThumbnails" >> MakeThumbnails(storage.join(config.output, THUMBNAILS), config.thumbnail_size)
    )
    if is_dry_run(pipeline_options):
        return build_only(pipeline)
    claim_output(config.output, OUTPUTS, config.overwrite, "a review", PAGE)  # the page: written last
    exits.on_interrupt(lambda: discard_unfinished(config.output, OUTPUTS, PAGE))
    result = run_to_end(pipeline)
    names = _thumbnails_made(config.output)
    made = {uri for uri in uris if thumbnail_name(uri) in names}
    page = _write_page(config, with_thumbnails(content, made), results)
    totals = content["totals"]
    print(
        f"reviewed {counted(totals['results'], 'result')} and {counted(totals['errors'], 'error')}: {page} "
        f"({len(made):,} of {counted(len(uris), 'thumbnail')}, {len(content['queue']):,} in the queue, "
        f"{counted(len(content['duplicates']), 'duplicate group')})"
    )
    return result


def _write_page(config: Config, content: dict, results) -> str:
    """Writes the charts and the page under ``--output``; returns the page's URI."""
    for name, png in charts(results).items():
        storage.write_atomic(storage.join(config.output, name), png)
    summary = read_summary(config.results)
    heading = {
        "results": config.results,
        "model": f"{results.model_name.iloc[0]} version {results.model_version.iloc[0]}"
        if len(results)
        else "",
        "inputs": summary.get("inputs"),
        "skipped": summary.get("skipped", 0),
    }
    page = storage.join(config.output, PAGE)
    storage.write_atomic(page, render(content, heading).encode("utf-8"))
    return page
