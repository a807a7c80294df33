"""What a run prints, and reading a classify output back.

The lines that end a classify run (``format_summary``: counts, the model,
errors by stage and type, where the files went and the commands that read
and review them) and a prepare run (``format_prepared``); and the readers of
a results folder that evaluate, review and export-labels share
(``read_results``, ``read_errors``, ``read_summary``), laid out as
``beamvision.transforms.outputs`` says.
"""

from __future__ import annotations

import io
import json
import shlex
from typing import Any

from beamvision import storage
from beamvision.console import counted
from beamvision.pipelines.flags import UsageError
from beamvision.transforms.outputs import (
    ERRORS_PREFIX,
    RESULTS_PREFIX,
    RUN_PARTITION,
    SUMMARY_FILE,
    errors_pattern,
    results_pattern,
)

ERROR_GROUPS_PRINTED = 8
METRICS_FILE = "metrics.json"  # what evaluate writes, to its own folder (evaluation_dir) by default
EVALUATION_SUFFIX = "-evaluation"


def evaluation_dir(results_dir: str) -> str:
    """Where evaluate writes by default: a folder of its own beside the results, never inside them."""
    return _beside(results_dir, EVALUATION_SUFFIX)


def _beside(results_dir: str, suffix: str) -> str:
    """``DIR<suffix>``; for an incremental run's ``ROOT/run=ID``, ``ROOT/_run=ID<suffix>``.

    A ``run=ID-evaluation`` folder in a catalog would be read as one more
    Hive partition; a leading ``_`` makes Hive, Spark, Arrow and DuckDB pass it over.
    """
    results_dir = results_dir.rstrip("/")
    parent, _, name = results_dir.rpartition("/")
    if name.startswith(f"{RUN_PARTITION}="):
        return f"{parent}/_{name}{suffix}" if parent else f"_{name}{suffix}"
    return results_dir + suffix


# --- reading a results folder ----------------------------------------------------------------------


def read_results(results_dir: str, columns: list[str], optional: tuple[str, ...] = ()):
    """All result rows of a classify output (only ``columns``), as one pandas DataFrame.

    ``optional``: columns read too where the shards have them (a multi-label
    model's ``labels``); a column the shards lack is not in the frame.

    Raises:
        UsageError: ``--results`` holds no result shards (it names no classify output).
    """
    frame = _read_shards(results_pattern(results_dir), columns, optional)
    if frame is None:
        raise UsageError(f"--results {results_dir}: no {RESULTS_PREFIX}-*.parquet shards there")
    return frame


def distinct_least_certain(rows):
    """Result rows least certain first (lowest top-1 score, then URI), one per distinct image.

    Rows whose bytes are equal (the same ``sha256``: the same photo in two
    folders or archives) collapse into the first of them, which gets the
    others' URIs in a ``duplicates`` column (a list, empty for most rows), so
    that a reviewer sees and labels each image once. A row without a hash is
    its own image. The hash is the one classify computed of the bytes it read.
    """
    ordered = rows.sort_values(["score", "image_uri"], kind="stable")
    image = ordered.sha256.where(ordered.sha256.notna(), "uri:" + ordered.image_uri)
    uris = ordered.groupby(image, sort=False).image_uri.agg(list)
    first = ~image.duplicated()
    kept = ordered[first].copy()
    kept["duplicates"] = [uris[key][1:] for key in image[first]]
    return kept.reset_index(drop=True)


def read_errors(results_dir: str, columns: list[str]):
    """All error rows of a classify output (only ``columns``); an empty frame when it has none."""
    import pandas as pd

    frame = _read_shards(errors_pattern(results_dir), columns)
    if frame is None:
        return pd.DataFrame({column: pd.Series(dtype=object) for column in columns})
    return frame


def read_summary(results_dir: str) -> dict[str, Any]:
    """A classify output's summary.json; empty when there is none (a run still going, or cut short)."""
    uri = storage.join(results_dir, SUMMARY_FILE)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else {}


def _read_shards(pattern: str, columns: list[str], optional: tuple[str, ...] = ()):
    """The Parquet shards matching ``pattern`` as one DataFrame (``optional`` columns where held); None
    when there are none."""
    import pandas as pd
    import pyarrow.parquet as pq

    shards = storage.match(pattern)
    if not shards:
        return None
    frames = []
    for shard in shards:
        parquet = pq.ParquetFile(io.BytesIO(storage.read_bytes(shard.path)))
        held = [c for c in optional if c in parquet.schema_arrow.names]
        frames.append(parquet.read(columns=[*columns, *held]).to_pandas())
    return pd.concat(frames, ignore_index=True)


# --- what a run prints ------------------------------------------------------------------------------


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines for the end of a run: what happened, what needs attention, what next."""
    labels = ", ".join(f"{x['label']} ({x['count']})" for x in summary["top_labels"][:5]) or "none"
    status = "" if summary["complete"] else "  WARNING: inputs != results + errors + skipped"
    skipped = (
        f", {summary['skipped']:,} skipped (classified by an earlier run)" if summary.get("skipped") else ""
    )
    unmatched = [f"WARNING: --input {p} matched no file" for p in summary.get("unmatched_patterns", [])]
    if summary.get("archive_members_not_images"):
        skipped += f", {summary['archive_members_not_images']:,} archive members not images (passed over)"
    # Inputs per second, which means nothing when no image was classified.
    per_second = summary.get("images_per_second") if summary["results"] else None
    rate = f" ({per_second:.1f} images/s)" if per_second else ""
    output = summary["output"]
    return "\n".join(
        [
            *unmatched,
            f"classified {summary['results']:,} of {counted(summary['inputs'], 'image')}, "
            f"{counted(summary['errors'], 'error')}{skipped}, in {summary['seconds']:.1f}s{rate}{status}",
            f"model: {summary['model']['name']} version {summary['model']['version']}"
            + _engine(summary["model"])
            + _timing(summary.get("timing", {})),
            f"top labels: {labels}",
            *format_error_groups(summary.get("error_groups", []), summary["output"]),
            f"outputs: {output} ({RESULTS_PREFIX}-*.parquet, {ERRORS_PREFIX}-*.parquet, {SUMMARY_FILE})",
            f"read them: {read_results_command(output)}",
            f"review them: {command('review', '--results', output, '--output', review_dir(output))}",
        ]
    )


def review_dir(results_dir: str) -> str:
    """Where the printed review command writes its report: beside the results (as ``evaluation_dir``)."""
    return _beside(results_dir, "-review")


def command(name: str, *argv: str) -> str:
    """A beamvision command line as printed for the user to run: every word shell-quoted."""
    return shlex.join(["beamvision", name, *argv])


def format_error_groups(groups: list[dict[str, Any]], output: str) -> list[str]:
    """The summary's lines on errors: each (stage, type) with its count and a sample; none without errors."""
    if not groups:
        return []
    total = sum(group["count"] for group in groups)
    lines = [f"errors by stage and type ({counted(total, 'row')} in {errors_pattern(output)}):"]
    width = len(f"{groups[0]['count']:,}")
    for group in groups[:ERROR_GROUPS_PRINTED]:
        message = " ".join(group["sample_message"].split())
        message = message if len(message) <= 100 else message[:99] + "…"
        lines.append(
            f"  {group['count']:>{width},}  {group['stage']} {group['error_type']}, "
            f"e.g. {group['sample_uri']}: {message}"
        )
    if len(groups) > ERROR_GROUPS_PRINTED:
        lines.append(
            f"  ... and {len(groups) - ERROR_GROUPS_PRINTED} more (stage, type) pairs, in {SUMMARY_FILE}"
        )
    return lines


def read_results_command(output: str) -> str:
    """A shell command that prints the first results of a classify output (local or gs://), with pyarrow.

    It reads the result shards only (``results-*.parquet``), whatever else
    the folder holds, from any directory: the folder is named canonically.
    """
    code = (
        "import pyarrow.dataset as ds, pyarrow.fs as pfs; "
        f"fs, path = pfs.FileSystem.from_uri({json.dumps(storage.canonical(output))}); "
        "shards = [f.path for f in fs.get_file_info(pfs.FileSelector(path)) "
        f'if f.base_name.startswith("{RESULTS_PREFIX}-") and f.base_name.endswith(".parquet")]; '
        'print(*ds.dataset(shards, filesystem=fs, format="parquet")'
        '.head(10, columns=["image_uri", "label", "score"]).to_pylist(), sep="\\n")'
    )
    return shlex.join(["python", "-c", code])


def _engine(model: dict[str, Any]) -> str:
    return f" ({model['engine']} {model['precision']})" if "engine" in model else ""


def _timing(timing: dict[str, float]) -> str:
    if "first_batch_seconds" not in timing:
        return ""
    load = f", model loaded in {timing['model_load_seconds']:.1f}s" if "model_load_seconds" in timing else ""
    return f"; first batch after {timing['first_batch_seconds']:.1f}s{load}"


def format_prepared(stats: dict[str, Any], output: str) -> list[str]:
    """The lines that end a prepare run: examples per split, errors by stage and type, what next."""
    totals = ", ".join(f"{split} {n:,}" for split, n in stats["totals"].items())
    return [
        f"prepared {stats['examples']:,} of {counted(stats['inputs'], 'image')} "
        f"({totals}; {counted(stats['errors'], 'error')}), "
        f"{counted(len(stats['counts']['train']), 'class', 'classes')} at {stats['image_size']}px, "
        f"to {output}",
        *format_error_groups(stats["error_groups"], output),
    ]


def empty_classes_warning(stats: dict[str, Any]) -> str | None:
    """A prepare run's warning about classes that no usable image represents; None when there are none."""
    empty = stats["empty_classes"]
    if not empty:
        return None
    return (
        f"WARNING: {counted(len(empty), 'class', 'classes')} {'has' if len(empty) == 1 else 'have'} "
        f"no usable image: {', '.join(empty[:10])} (kept in labels.json; no image of theirs was named, "
        f"or every one failed: see {ERRORS_PREFIX}-*.parquet)"
    )
