"""``WriteResults`` and ``WriteErrors``: Parquet result and error shards, then summary.json.

Layout under the output directory (names from ``beamvision.transforms.outputs``)::

    results-SSSSS-of-NNNNN.parquet   one row per classified image (RESULT_FIELDS)
    errors-SSSSS-of-NNNNN.parquet    one row per input that could not be classified
    summary.json                     written last, after every shard is in place

The row schemas are in ``beamvision.transforms.rows``.
"""

from __future__ import annotations

import json
import shlex
import time
from typing import Any

import apache_beam as beam

from beamvision import storage
from beamvision.transforms.outputs import ERRORS_PREFIX, RESULTS_PREFIX, SUMMARY_FILE
from beamvision.transforms.read import unmatched_patterns
from beamvision.transforms.rows import ERROR_SCHEMA, result_schema

TOP_LABELS_IN_SUMMARY = 20
ERROR_GROUPS_PRINTED = 8


def build_summary(
    inputs: int,
    results: int,
    errors: int,
    skipped: int,
    seconds: float,
    model: dict[str, Any],
    top_labels: list[tuple[str, int]],
    output: str,
    unmatched: list[str] | None = None,
    not_images: int = 0,
    error_groups: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The content of summary.json.

    ``unmatched``: --input patterns that matched no file; ``not_images``:
    archive members passed over because their names are not images;
    ``error_groups``: ``SummarizeErrors``' output.
    """
    return {
        "inputs": inputs,
        "results": results,
        "errors": errors,
        "skipped": skipped,
        "complete": inputs == results + errors + skipped,
        "seconds": round(seconds, 3),
        "images_per_second": round(inputs / seconds, 2) if seconds > 0 else None,
        "model": model,
        "top_labels": [{"label": label, "count": count} for label, count in top_labels],
        "error_groups": list(error_groups or []),
        "unmatched_patterns": list(unmatched or []),
        "archive_members_not_images": not_images,
        "output": output,
    }


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
    return "\n".join(
        [
            *unmatched,
            f"classified {summary['results']:,} of {summary['inputs']:,} images, "
            f"{summary['errors']:,} errors{skipped}, in {summary['seconds']:.1f}s "
            f"({summary['images_per_second'] or 0:.1f} images/s){status}",
            f"model: {summary['model']['name']} version {summary['model']['version']}"
            + _engine(summary["model"])
            + _timing(summary.get("timing", {})),
            f"top labels: {labels}",
            *format_error_groups(summary.get("error_groups", []), summary["output"]),
            f"outputs: {summary['output']} ({RESULTS_PREFIX}-*.parquet, {ERRORS_PREFIX}-*.parquet, "
            f"{SUMMARY_FILE})",
            f"read them: {read_results_command(summary['output'])}",
            f"review them: beamvision review --results {summary['output']} --output "
            f"{summary['output'].rstrip('/')}-review",
        ]
    )


def format_error_groups(groups: list[dict[str, Any]], output: str) -> list[str]:
    """The summary's lines on errors: each (stage, type) with its count and a sample; none without errors."""
    if not groups:
        return []
    total = sum(group["count"] for group in groups)
    rows = f"{total:,} row" + ("" if total == 1 else "s")
    lines = [f"errors by stage and type ({rows} in {storage.join(output, ERRORS_PREFIX)}-*.parquet):"]
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
    """A shell command that prints the first results of a classify output (local or gs://), with pyarrow."""
    code = (
        f'import pyarrow.dataset as ds; print(*ds.dataset({json.dumps(output)}, format="parquet", '
        'ignore_prefixes=[".", "errors-", "summary"]).head(10, columns=["image_uri", "label", "score"])'
        '.to_pylist(), sep="\\n")'
    )
    return f"python -c {shlex.quote(code)}"


def merge_error_groups(values) -> tuple[int, str, str]:
    """(count, sample URI, its message) of one (stage, error type) merged: counts add, the first URI stays."""
    count, sample = 0, None
    for n, uri, message in values:
        count += n
        if sample is None or uri < sample[0]:
            sample = (uri, message)
    return count, *sample


class SummarizeErrors(beam.PTransform):
    """Error rows to one list (one element): a group per (stage, error type), most frequent first.

    Each group is ``{stage, error_type, count, sample_uri, sample_message}``;
    the sample is the group's first URI in sort order, so reruns agree.
    """

    def expand(self, errors):
        return (
            errors
            | "StageAndType"
            >> beam.Map(lambda r: ((r["stage"], r["error_type"]), (1, r["image_uri"], r["message"])))
            | "PerStageAndType" >> beam.CombinePerKey(merge_error_groups)
            | "AsGroups"
            >> beam.MapTuple(
                lambda key, merged: {
                    "stage": key[0],
                    "error_type": key[1],
                    "count": merged[0],
                    "sample_uri": merged[1],
                    "sample_message": merged[2],
                }
            )
            | "Gathered" >> beam.combiners.ToList()
            | "MostFirst" >> beam.Map(sorted, key=lambda g: (-g["count"], g["stage"], g["error_type"]))
        )


def _engine(model: dict[str, Any]) -> str:
    return f" ({model['engine']} {model['precision']})" if "engine" in model else ""


def _timing(timing: dict[str, float]) -> str:
    if "first_batch_seconds" not in timing:
        return ""
    load = f", model loaded in {timing['model_load_seconds']:.1f}s" if "model_load_seconds" in timing else ""
    return f"; first batch after {timing['first_batch_seconds']:.1f}s{load}"


class WriteErrors(beam.PTransform):
    """Writes error rows as ``errors-SSSSS-of-NNNNN.parquet`` under ``output``; yields the file names."""

    def __init__(self, output: str):
        super().__init__()
        self._output = output

    def expand(self, errors):
        return errors | "WriteParquet" >> beam.io.WriteToParquet(
            storage.join(self._output, ERRORS_PREFIX), ERROR_SCHEMA, file_name_suffix=".parquet"
        )


class WriteResults(beam.PTransform):
    """Writes result and error rows as Parquet shards, then summary.json.

    Input: a dict with PCollections ``results`` and ``errors`` (row dicts),
    ``inputs`` (one element per input file, counted for the summary) and
    ``patterns`` ((pattern, files matched) from ``MatchInputs``), optionally
    ``not_images`` (counts of archive members passed over) and, in an
    incremental run, ``skipped`` (files an earlier run classified).
    """

    def __init__(self, output: str, embeddings: bool, model: dict[str, Any], started_at: float):
        super().__init__()
        self._output = output
        self._embeddings = embeddings
        self._model = model
        self._started_at = started_at

    def expand(self, pcolls):
        results, errors, inputs = pcolls["results"], pcolls["errors"], pcolls["inputs"]
        nothing = inputs.pipeline | "Nothing" >> beam.Create([])
        skipped = pcolls.get("skipped", nothing)
        not_images = pcolls.get("not_images", nothing)
        written_results = results | "WriteResultShards" >> beam.io.WriteToParquet(
            storage.join(self._output, RESULTS_PREFIX),
            result_schema(self._embeddings),
            file_name_suffix=".parquet",
        )
        written_errors = errors | "WriteErrorShards" >> WriteErrors(self._output)
        count = beam.combiners.Count
        top_labels = (
            results
            | "Labels" >> beam.Map(lambda row: row["label"])
            | "CountLabels" >> count.PerElement()
            | "TopLabels" >> beam.combiners.Top.Of(TOP_LABELS_IN_SUMMARY, key=lambda kv: (kv[1], kv[0]))
        )
        return (
            inputs.pipeline
            | "SummaryTrigger" >> beam.Create([None])
            | "WriteSummary"
            >> beam.ParDo(
                _WriteSummaryFn(self._output, self._model, self._started_at),
                inputs=beam.pvalue.AsSingleton(inputs | "CountInputs" >> count.Globally()),
                results=beam.pvalue.AsSingleton(results | "CountResults" >> count.Globally()),
                errors=beam.pvalue.AsSingleton(errors | "CountErrors" >> count.Globally()),
                skipped=beam.pvalue.AsSingleton(skipped | "CountSkipped" >> count.Globally()),
                not_images=beam.pvalue.AsSingleton(not_images | "SumNotImages" >> beam.CombineGlobally(sum)),
                top_labels=beam.pvalue.AsSingleton(top_labels),
                error_groups=beam.pvalue.AsSingleton(errors | "SummarizeErrors" >> SummarizeErrors()),
                patterns=beam.pvalue.AsList(pcolls["patterns"]),
                # Side inputs are complete before the step runs: the summary
                # is written only after every shard has been finalised.
                result_files=beam.pvalue.AsList(written_results),
                error_files=beam.pvalue.AsList(written_errors),
            )
        )


class _WriteSummaryFn(beam.DoFn):
    def __init__(self, output: str, model: dict[str, Any], started_at: float):
        self._output = output
        self._model = model
        self._started_at = started_at

    def process(
        self,
        _,
        inputs,
        results,
        errors,
        skipped,
        not_images,
        top_labels,
        error_groups,
        patterns,
        result_files,
        error_files,
    ):
        seconds = time.time() - self._started_at
        summary = build_summary(
            inputs,
            results,
            errors,
            skipped,
            seconds,
            self._model,
            top_labels,
            self._output,
            unmatched_patterns(patterns),
            not_images,
            error_groups,
        )
        storage.write_atomic(
            storage.join(self._output, SUMMARY_FILE), json.dumps(summary, indent=2).encode("utf-8")
        )
        yield summary
